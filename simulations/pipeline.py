"""The whole pipeline, ``make demo``: ``python -m simulations.pipeline [key=value ...]``.

1. the federation (``method`` of the config, default: modality-aware FedAvg over 8
   incomplete-modality nodes) under Flower's simulation engine, exporting its model bundle;
   after its last round every node sends its frozen-encoder tokens and labels for the LM
   stage over Flower (``llm.upload.collect``; ``<output_dir>/federation/uploads``);
2. the IoT-LM stage on that bundle and those uploads (``llm.upload.dir``) with the offline
   default LM (every configured conditioning tuned, chosen on validation);
3. one question answered about a test sample, naming the sensors it used.

Outputs: ``<output_dir>/federation`` and ``<output_dir>/llm`` (each with results.json);
the last line printed is the LM stage's results.json.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from fed_iotlm.config_schema import GRID_METHODS
from simulations.run import hydra_command, run_experiment


def run_pipeline(cfg: dict, out_dir: Path) -> Path:
    from fed_iotlm.data.federation import build_layout
    from fed_iotlm.llm.ask import Assistant
    from fed_iotlm.llm.stage import run_stage
    from fed_iotlm.tracking import console

    t0 = time.time()
    upload = cfg["llm"]["upload"]
    # the nodes send the stage's tokens over Flower; the in-process baselines have no
    # nodes to ask, and the stage computes their uploads from the layout
    collect = cfg["method"] in GRID_METHODS
    fed_cfg = {**cfg, "llm": {**cfg["llm"], "upload": {**upload, "collect": collect}}}
    run_experiment(fed_cfg, out_dir / "federation")
    bundle = out_dir / "federation" / "bundle"
    if not bundle.is_dir():
        raise RuntimeError(f"method={cfg['method']} exported no model bundle ({bundle})")
    t1 = time.time()
    if collect and cfg["llm"]["data"] == "nodes" and not upload.get("dir"):
        upload = {**upload, "dir": str(out_dir / "federation" / "uploads")}
    llm_cfg = {**cfg, "llm": {**cfg["llm"], "bundle": str(bundle), "upload": upload}}
    path = run_stage(llm_cfg, out_dir / "llm")
    t2 = time.time()
    ds = build_layout(cfg).dataset
    task = next(iter(ds.meta.tasks))
    index = first_labelled(ds.test.y[task])
    spec = ds.meta.tasks[task]
    question = f"What is the {spec.title} in this recording?"
    answer = Assistant(out_dir / "llm").ask(ds.test, index, question)
    truth = spec.classes[int(ds.test.y[task][index])]
    console.print(f"[bold]Q[/bold] (test sample {index}): {question}")
    console.print(f"[bold]A[/bold]: {answer.text}   (names {answer.label}; true {task}: {truth})")
    console.print(f"sensors used: {', '.join(answer.sensors)} ({answer.conditioning} conditioning)")
    if answer.missing:
        console.print(f"sensors missing (masked, no token): {', '.join(answer.missing)}")
    console.print(
        f"federation {t1 - t0:.0f}s, LM stage {t2 - t1:.0f}s, answer {time.time() - t2:.0f}s"
    )
    return path


def first_labelled(y) -> int:
    """The first test row labelled for the task asked about (real data has unlabelled
    rows: ExtraSensory minutes without a main activity)."""
    rows = np.flatnonzero(np.asarray(y) >= 0)
    if rows.size == 0:
        raise RuntimeError("no test sample is labelled for the first task: nothing to ask")
    return int(rows[0])


main = hydra_command(run_pipeline)

if __name__ == "__main__":
    main()
