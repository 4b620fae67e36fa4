"""The model card that travels with an exported student: what it is, what it was measured to do, against what,
on what data and machine, and the report's honest verdict. Every accuracy comes from the report as it is;
the card computes only the intervals of the report's per-seed test accuracies."""

from __future__ import annotations

import time

import torch

from kdtune import data, hardware, report, runtime, timing, user_code

JSON, MARKDOWN = "model_card.json", "MODEL_CARD.md"


def describe_input(input_shape: tuple[int, ...]) -> dict:
    """What the exported graph takes: kdtune's preprocessing (kdtune.data.model_inputs) is inside it."""
    shape = data.raw_shape(input_shape)
    images = len(input_shape) == 3
    layout = {2: "(N, H, W): N grey images of H x W pixels", 3: "(N, H, W, 3): N colour (RGB) images of H x W pixels",
              1: "(N, D): N feature vectors of length D"}[len(shape)]
    return {"name": runtime.INPUT_NAME, "dtype": str(data.raw_dtype(input_shape)), "shape": list(shape),
            "layout": f"{layout}, any N",
            "scaling": "none: the graph divides by 255 itself, as kdtune did in training" if images else
            "none: the vectors as kdtune read them",
            "orientation": "as kdtune read the training images (transposed when the spec's [data] transpose = true)"
            if images else "the features in the order of the training file's columns",
            "output": f"{runtime.OUTPUT_NAME} (N, classes): unnormalised; softmax gives probabilities"}


def describe_student(architecture: dict) -> str:
    family, depth = architecture["family"], architecture["depth"]
    if user_code.is_reference(family):
        return f"A student of your own family ({family})"
    return "A small CNN student" if family == "cnn" else \
        f"A {'one' if depth == 1 else depth}-hidden-layer MLP student"


def card(found: dict, chosen, checked: dict, latency: dict, rebuild: dict, multiply_adds: int) -> dict:
    """The card of `chosen` (an export.Chosen) from the report `found`, the parity `checked`, the `latency`
    measured per runtime, the configuration to `rebuild` it, and its multiply-adds per image."""
    band, seed_index = chosen.band, chosen.seed_index
    tuned, twin = band["rows"]["tuned"], band["rows"]["no_distillation"]

    def accuracy(row: dict) -> dict:
        mean, low, high = report.mean_interval(row["test_accuracy"])
        return {"mean": mean, "std": row["test_std"], "ci95_low": low, "ci95_high": high,
                "per_seed": row["test_accuracy"]}

    return {
        "study": found["study"], "trial": band["winner_trial"], "size_band": band["band_label"],
        "overall_winner": band["winner_trial"] == found["winner_trial"], "seed": found["seeds"][seed_index],
        "seeds": found["seeds"], "configuration": rebuild["config"], "architecture": rebuild["architecture"],
        "n_parameters": tuned["n_parameters"], "multiply_adds": multiply_adds,
        "n_classes": rebuild["architecture"]["n_classes"], "class_names": rebuild["class_names"],
        "input": rebuild["input"],
        "test_accuracy": {"this_model": tuned["test_accuracy"][seed_index],
                          "this_model_val_accuracy": tuned["val_accuracy"][seed_index],
                          "tuned": accuracy(tuned), "no_distillation": accuracy(twin),
                          "gain": band["gain"], "teacher": found["teacher"]["test_accuracy"],
                          # None: a report made before it recorded its students' precision
                          "precision": tuned.get("precision")},
        "finding": band["finding"], "front_verdict": found["front_verdict"], "verdict": found["verdict"],
        "teacher": {"cache_id": found["teacher"]["cache_id"], "n_parameters": found["teacher"]["n_parameters"]},
        "data_fingerprint": found["data_fingerprint"], "report_created": found["created"],
        "latency": {name: {str(batch): timed for batch, timed in by_batch.items()}
                    for name, by_batch in latency.items()},
        "latency_machine": {"cpu": hardware.cpu_model(), "cpu_flags": hardware.reported_cpu_flags(),
                            "threads": torch.get_num_threads(), "n_calls": timing.N_TIMED_CALLS,
                            "n_warmup_calls": timing.N_WARMUP_CALLS},
        "parity": checked, "versions": found["versions"], "export_versions": export_versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def export_versions() -> dict:
    """The packages that exported and timed the student (the report's `versions` trained it)."""
    from importlib.metadata import version

    return {"torch": torch.__version__, **{name: version(name) for name in runtime.PACKAGES}}


def to_markdown(c: dict) -> str:
    config, acc = c["configuration"], c["test_accuracy"]

    def interval(a: dict) -> str:
        return f"{100 * a['mean']:.2f}% (95% CI {100 * a['ci95_low']:.2f} to {100 * a['ci95_high']:.2f})"

    gain = acc["gain"]
    machine = c["latency_machine"]
    lines = [
        f"# Model card: study {c['study']}, trial {c['trial']}", "",
        f"{describe_student(c['architecture'])} (width {config['width']}, {c['n_parameters']:,} parameters, "
        + ("multiply-adds not counted" if c["multiply_adds"] is None
           else f"{c['multiply_adds']:,} multiply-adds per input") + ") distilled by kdtune from "
        + (f"a teacher of {c['teacher']['n_parameters']:,} parameters; " if c["teacher"]["n_parameters"] else
           "a teacher given as logits; ")
        + ("the report's overall winner" if c["overall_winner"] else f"the winner of size band {c['size_band']}")
        + f", seed {c['seed']} (the best of seeds {c['seeds']} on validation).", "",
        "## Configuration", "",
        f"Temperature {config['temperature']:.4g}, lambda {config['lambda']:.4g} (weight of the label loss), "
        f"width {config['width']}, loss `{config['loss']}`. Rebuild: `kdtune.export.rebuild(folder)`, or "
        "`student.json` and `student.pt` (a `state_dict`; `torch.load(weights_only=True)` reads it).", "",
        "## Input", "",
        f"`{c['input']['name']}`: {c['input']['dtype']}, {c['input']['layout']}, each of shape "
        f"{tuple(c['input']['shape'])}; {c['n_classes']} classes"
        + (f" ({', '.join(c['class_names'])})" if c["class_names"] else "")
        + f". Scaling: {c['input']['scaling']}. Orientation: {c['input']['orientation']}. Output: "
        f"{c['input']['output']}.", "",
        "## Accuracy on the test set (from the report)", "",
        "| model | test accuracy |", "|---|---|",
        f"| this model (seed {c['seed']}) | {100 * acc['this_model']:.2f}% |",
        f"| tuned, over {len(c['seeds'])} seeds | {interval(acc['tuned'])} |",
        f"| same student without distillation | {interval(acc['no_distillation'])} |",
        f"| teacher | {100 * acc['teacher']:.2f}% |", "",
        *(["The students' accuracies were read in bf16 autocast, the precision they trained in; the exported "
           "student computes in fp32, so its predictions can differ from these on a few images.", ""]
          if acc.get("precision") == "bf16" else []),
        f"Distillation gain, paired over seeds: {100 * gain['mean']:+.2f} points (95% CI "
        f"{100 * gain['ci95_low']:+.2f} to {100 * gain['ci95_high']:+.2f}): {c['finding']}.", "",
        f"**The report's verdict.** {c['verdict']}", "",
        f"**By size.** {c['front_verdict']}", "",
        "## Latency (ms per call, CPU)", "",
        "| runtime | batch 1 median | batch 1 p95 | batch 256 median | batch 256 p95 |", "|---|---|---|---|---|",
    ]
    for name, label in (("pytorch", "PyTorch (eager, fp32)"), ("onnxruntime", "ONNX Runtime")):
        one, many = c["latency"][name]["1"], c["latency"][name]["256"]
        lines.append(f"| {label} | {one['median_ms']:.4g} | {one['p95_ms']:.4g} | {many['median_ms']:.4g} | "
                     f"{many['p95_ms']:.4g} |")
    parity = c["parity"]
    lines += [
        "", f"{machine['n_calls']} timed calls after {machine['n_warmup_calls']} untimed, on {machine['cpu']} "
        f"({', '.join(machine['cpu_flags']) or 'no reported flags'}) with {machine['threads']} thread(s) in each "
        "runtime. PyTorch is timed on the student's float input; ONNX Runtime on the input as it ships, its "
        "scaling included.", "",
        "## Provenance", "",
        f"Parity on {parity['n_images']:,} test images: largest logit difference "
        f"{parity['max_abs_logit_difference']:.2g}, same prediction on {100 * parity['same_predictions']:.2f}%. "
        f"Data fingerprint `{c['data_fingerprint'][:16]}`, teacher cache `{c['teacher']['cache_id']}`, report of "
        f"{c['report_created']}, exported {c['created']}. Trained with "
        + ", ".join(f"{name} {value}" for name, value in c["versions"].items()) + "; exported with "
        + ", ".join(f"{name} {value}" for name, value in c["export_versions"].items()) + ".",
    ]
    return "\n".join(lines) + "\n"
