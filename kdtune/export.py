"""Ship the report's student: its trained weights as ONNX, checked against PyTorch, timed, with a model card.

Nothing is retrained and nothing is chosen on the test set. The student is one of the report's band winners
(the overall winner, the best band winner within a budget by validation accuracy, or one named by its trial),
and of its seeds the one with the best validation accuracy. The test images serve only the parity check.

The files go to a scratch folder first: a graph that ONNX Runtime does not run like PyTorch, or a folder that
cannot be written, leaves the destination as it was.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kdtune import cost, counting, data, model_card, report, runtime, saved_runs, student
from kdtune.budget import Budget
from kdtune.data import Splits
from kdtune.spec import Spec, SpecError
from kdtune.student import StudentConfig

# Parity between ONNX Runtime and PyTorch on the test images, or nothing is written
MAX_LOGIT_DIFFERENCE = 1e-4
MIN_SAME_PREDICTIONS = 0.999
WEIGHTS, ONNX, CONFIG = "student.pt", "student.onnx", "student.json"
WRITTEN = (WEIGHTS, ONNX, CONFIG, model_card.JSON, model_card.MARKDOWN)


@dataclass(frozen=True)
class Chosen:
    band: dict  # the report's front entry of the band whose winner ships
    seed_index: int  # which of the report's seeds

    @property
    def config(self) -> StudentConfig:
        return StudentConfig.from_params(self.band["rows"]["tuned"]["config"])


def choose(found: dict, budget: Budget = Budget(), trial: int | None = None) -> Chosen:
    """The report's student to ship: the one trained with `trial`'s configuration, else the band winner with
    the best validation accuracy within `budget` (with no budget, the report's overall winner)."""
    bands_found = found.get("front") or []
    if not bands_found or "run_files" not in bands_found[0]["rows"]["tuned"]:
        raise SpecError("the report predates `kdtune export`; run `kdtune report` again (it reuses the students it "
                        "trained) and then export.")
    winners = ", ".join(str(b["winner_trial"]) for b in bands_found)
    if trial is not None:
        if budget.max_params is not None or budget.max_latency_ms is not None:
            raise SpecError("--trial names the student itself; give it without --max-params or --max-latency-ms.")
        picked = [b for b in bands_found if b["winner_trial"] == trial]
        if not picked:
            raise SpecError(f"trial {trial} is not one of the report's band winners ({winners}); only they were "
                            "tested against their twins. Choose one of those.")
        band = picked[0]
    else:
        if budget.max_latency_ms is not None and all(budget.latency_key not in b["latency"] for b in bands_found):
            raise SpecError(f"the report did not time its students in {budget.runtime}; install kdtune[export] "
                            "and run `kdtune report` again (it reuses the students it trained).")
        within = [b for b in bands_found
                  if budget.admits_costs({**b["latency"], "n_parameters": b["rows"]["tuned"]["n_parameters"]})]
        if not within:
            raise SpecError(f"no student of the report has {budget}: its band winners are trials {winners}, the "
                            f"smallest with {min(b['rows']['tuned']['n_parameters'] for b in bands_found):,} "
                            "parameters; raise the budget.")
        band = report.best_band(within)  # with no budget, the report's overall winner
    vals = band["rows"]["tuned"]["val_accuracy"]
    return Chosen(band, vals.index(max(vals)))


def default_folder(spec: Spec, chosen: Chosen) -> Path:
    return spec.output_dir / "export" / f"trial-{chosen.band['winner_trial']}"


def load_student(spec: Spec, found: dict, chosen: Chosen, splits: Splits) -> torch.nn.Module:
    """The chosen seed's trained student, from the report's runs, on the CPU in fp32."""
    if splits.fingerprint != found["data_fingerprint"]:
        raise SpecError(f"the data at {spec.data.path or spec.data.format} is not the data the report used "
                        "(its fingerprint changed); run `kdtune report` on this data first.")
    path = report.runs_folder(spec) / chosen.band["rows"]["tuned"]["run_files"][chosen.seed_index]
    try:
        architecture = student.Architecture.of(spec.student, splits.input_shape, splits.n_classes)
        model, _ = saved_runs.load(path, lambda: architecture.build(chosen.config.width), torch.device("cpu"))
    except FileNotFoundError:
        raise SpecError(f"the report's student {path} is missing; run `kdtune report` again to retrain it.") from None
    except saved_runs.READ_ERRORS as error:
        raise SpecError(f"the report's student {path} is unreadable ({type(error).__name__}); delete it and run "
                        "`kdtune report` again.") from error
    return model.eval()


def parity(model: torch.nn.Module, onnx_session, samples: torch.Tensor) -> dict:
    """ONNX Runtime's logits against PyTorch's on the same samples, as the user holds them (`data.raw_samples`)."""
    with torch.inference_mode():
        expected = runtime.FromRaw(model).eval()(samples).numpy()
    found = runtime.logits(onnx_session, samples.numpy())
    return {"n_images": len(samples), "max_abs_logit_difference": float(np.abs(found - expected).max()),
            "same_predictions": float((found.argmax(1) == expected.argmax(1)).mean())}


def check_destination(folder: Path) -> Path:
    """`folder`, resolved, when it is new, empty or an earlier export (which the export replaces); anything
    else is refused rather than emptied."""
    folder = folder.resolve()
    if folder.is_file():
        raise SpecError(f"--out {folder} is a file; name a folder for the exported student.")
    foreign = sorted(p.name for p in folder.iterdir() if p.name not in WRITTEN) if folder.is_dir() else []
    if foreign:
        raise SpecError(f"--out {folder} holds other files ({', '.join(foreign[:3])}"
                        f"{', ...' if len(foreign) > 3 else ''}); name a new or empty folder.")
    if folder.parent == folder:
        raise SpecError(f"--out {folder} is a file system's root; name a folder for the exported student.")
    return folder


def replace_folder(scratch: Path, folder: Path) -> None:
    """Put `scratch` where `folder` is, keeping the earlier `folder` until the new one is in place."""
    old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    if folder.exists():
        os.replace(folder, old)
    try:
        os.replace(scratch, folder)
    except OSError:
        if old.exists():
            os.replace(old, folder)
        raise
    shutil.rmtree(old, ignore_errors=True)


def export(spec: Spec, found: dict, chosen: Chosen, splits: Splits, folder: Path) -> dict:
    """Write the chosen student to `folder` (replacing an earlier export there) and return its model card."""
    runtime.require("kdtune export")
    folder = check_destination(folder)
    architecture = student.Architecture.of(spec.student, splits.input_shape, splits.n_classes)
    model = load_student(spec, found, chosen, splits)
    scratch = folder.with_name(f".{folder.name}.partial-{os.getpid()}")
    try:
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
        runtime.to_onnx(model, splits.input_shape, scratch / ONNX)
        onnx_session = runtime.session(scratch / ONNX)
        checked = parity(model, onnx_session, data.raw_samples(splits.x_test))
        # written so that a NaN fails too
        if not (checked["max_abs_logit_difference"] <= MAX_LOGIT_DIFFERENCE
                and checked["same_predictions"] >= MIN_SAME_PREDICTIONS):
            raise SpecError(f"ONNX Runtime does not run the exported student as PyTorch does on the test images "
                            f"(largest logit difference {checked['max_abs_logit_difference']:.2g}, same prediction "
                            f"on {100 * checked['same_predictions']:.2f}%): nothing was written; report it with "
                            "the output of --debug.")
        latency = {"pytorch": cost.latency(model, splits.input_shape),
                   "onnxruntime": runtime.latency(onnx_session, splits.input_shape)}
        torch.save(model.state_dict(), scratch / WEIGHTS)
        rebuild = {"architecture": architecture.as_record(), "config": chosen.config.as_params(),
                   "class_names": splits.class_names, "input": model_card.describe_input(splits.input_shape)}
        (scratch / CONFIG).write_text(json.dumps(rebuild, indent=2))
        card = model_card.card(found, chosen, checked, latency, rebuild,
                               counting.multiply_adds(model, splits.input_shape))
        (scratch / model_card.JSON).write_text(json.dumps(card, indent=2))
        (scratch / model_card.MARKDOWN).write_text(model_card.to_markdown(card))
        replace_folder(scratch, folder)
    except OSError as error:  # it would name the hidden scratch folder beside `folder`, not the folder asked for
        raise SpecError(f"cannot write the export to {folder} ({error.strerror or error}); name a folder you can "
                        "write with --out.") from error
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return card


def rebuild(folder: Path) -> torch.nn.Module:
    """The exported student as a PyTorch module again, from the folder `export` wrote: the documented way back
    from the files (only the weights are read with torch.load, with weights_only)."""
    described = json.loads((folder / CONFIG).read_text())
    model = architecture_of(described).build(StudentConfig.from_params(described["config"]).width)
    model.load_state_dict(torch.load(folder / WEIGHTS, map_location="cpu", weights_only=True))
    return model.eval()


def architecture_of(described: dict) -> student.Architecture:
    """The students' architecture a `student.json` records; one written before colour images and student
    families records a one-layer MLP on grey (H, W) images."""
    if "architecture" in described:
        return student.Architecture.from_record(described["architecture"])
    return student.Architecture("mlp", 1, (1, *described["image_shape"]), described["n_classes"])


def summary(card: dict, folder: Path, published: dict[str, str]) -> str:
    """A few lines on an export, for the terminal and the trial's note."""
    acc, latency = card["test_accuracy"], card["latency"]
    return "\n".join([
        f"Exported trial {card['trial']} ({card['size_band']}, seed {card['seed']}, {card['n_parameters']:,} "
        f"parameters) to {folder}: {', '.join(sorted(published))} (in the study's artifacts).",
        f"Test accuracy {100 * acc['this_model']:.2f}% (over the report's seeds {100 * acc['tuned']['mean']:.2f}%, "
        f"without distillation {100 * acc['no_distillation']['mean']:.2f}%: {card['finding']}).",
        f"Latency per call, median: ONNX Runtime {latency['onnxruntime']['1']['median_ms']:.3g} ms at batch 1, "
        f"{latency['onnxruntime']['256']['median_ms']:.3g} ms at batch 256; PyTorch "
        f"{latency['pytorch']['1']['median_ms']:.3g} / {latency['pytorch']['256']['median_ms']:.3g} ms "
        f"({card['latency_machine']['threads']} thread(s), {card['latency_machine']['cpu']}).",
        f"ONNX Runtime matches PyTorch on {card['parity']['n_images']:,} test images (largest logit difference "
        f"{card['parity']['max_abs_logit_difference']:.2g}).",
    ])
