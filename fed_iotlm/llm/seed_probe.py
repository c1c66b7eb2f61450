"""Why a tuned seed adapter does or does not let the LM read the sensors.

``python -m fed_iotlm.llm.seed_probe <tune output dir>`` (a ``fed-iotlm tune`` run with
``seed_adapter`` among its conditionings) prints, per task, as JSON:

* ``probe``: test accuracy of a linear probe (scikit-learn's logistic regression, fit on
  the stage's training rows with a label, scored on its test rows) on the fused bundle
  feature (what the federated head reads), on the adapter's fused input z, and on the
  rank-r code U_{l,τ} z of each adapted layer: does the class survive into what the
  adapter hands the LM?
* ``sample_spread``: per adapted layer, ‖std over samples of A_{l,τ}(z)‖ / ‖mean over
  samples of A_{l,τ}(z)‖.  A(z) is one vector per sequence added to the residual stream;
  a spread of 0.1 means 90 % of what the adapter adds is the same for every recording (a
  task-wise bias that can learn the answer's format and prior, not the class);
* ``output_ratio``: the run's last logged ‖A(z)‖ / ‖feed-forward output‖ per layer.

docs/llm.md ("The seed's adapter at equal budget") has what it showed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch


def linear_probe(
    x_fit: np.ndarray, y_fit: np.ndarray, x_test: np.ndarray, y_test: np.ndarray
) -> float:
    """Test accuracy of a logistic-regression probe on standardised features."""
    from sklearn.linear_model import LogisticRegression

    x_fit, x_test = np.asarray(x_fit, np.float64), np.asarray(x_test, np.float64)
    mu, sd = x_fit.mean(0), x_fit.std(0) + 1e-8
    clf = LogisticRegression(max_iter=2000).fit((x_fit - mu) / sd, y_fit)
    return float(clf.score((x_test - mu) / sd, y_test))


def sample_spread(delta: torch.Tensor) -> float:
    """‖std over samples‖ / ‖mean over samples‖ of per-sample vectors ``delta`` [N, H]."""
    mean = delta.mean(0).norm()
    return float(delta.std(0).norm() / mean.clamp_min(1e-12))


def probe_run(run: Path) -> dict:
    """The probe of the module docstring for the ``seed_adapter`` of tune output ``run``."""
    from safetensors.torch import load_file

    from fed_iotlm.federation.bundle import bundle_standardizer, load_bundle

    from .recipe import stage_data
    from .seed_adapter import SeedAdapter

    doc = json.loads((run / "results.json").read_text())
    report = doc["llm"]["conditioning"].get("seed_adapter")
    if report is None:
        raise ValueError(f"{run}: no seed_adapter among the tuned conditionings")
    cfg = doc["config"]
    encoder, meta = load_bundle(Path(cfg["llm"]["bundle"]))
    data = stage_data(cfg, encoder, bundle_standardizer(meta))
    feats = data.feats
    state = load_file(str(run / "checkpoint-seed_adapter" / "sensor.safetensors"))
    layers, tasks, rank, _ = state["down"].shape
    hidden = state["up"].shape[2]
    adapter = SeedAdapter(feats.names, feats.dim, hidden, tasks, layers,
                          report["seed_adapter"]["fusion"], rank, "z_mean" in state)  # fmt: skip
    adapter.load_state_dict(state)
    adapter.eval()  # as evaluated: a centred adapter subtracts its running mean
    with torch.no_grad():
        z = adapter.fuse(feats.feats, feats.present)
    n_train = len(data.train)
    last = [h for h in doc["history"] if h.get("conditioning") == "seed_adapter"]
    out: dict = {}
    for ti, task in enumerate(doc["llm"]["task_classes"]):
        y_fit, y_test = np.asarray(data.train.y[task]), np.asarray(data.test.y[task])
        fit, test = np.nonzero(y_fit >= 0)[0], np.nonzero(y_test >= 0)[0]

        def probe(x: np.ndarray, fit=fit, test=test, y_fit=y_fit, y_test=y_test) -> float:
            return round(
                linear_probe(x[:n_train][fit], y_fit[fit], x[n_train:][test], y_test[test]), 3
            )

        with torch.no_grad():
            code = torch.einsum("lrf,nf->lnr", adapter.down[:, ti], z)  # U z per layer
            delta = torch.einsum("lhr,lnr->lnh", adapter.up[:, ti], code)  # A(z) per layer
        out[task] = {
            "probe": {
                **(
                    {"fused_feature": probe(feats.feats["fused"].numpy())}
                    if "fused" in feats.feats
                    else {}
                ),  # fmt: skip
                "z": probe(z.numpy()),
                "Uz_per_layer": [probe(code[li].numpy()) for li in range(layers)],
            },
            "sample_spread": [round(sample_spread(delta[li]), 3) for li in range(layers)],
            "fit_rows": int(len(fit)),
            "test_rows": int(len(test)),
        }
    out["output_ratio"] = last[-1].get("seed_adapter_ratio") if last else None
    out["layers"] = report["seed_adapter"]["layers"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a fed-iotlm tune output with seed_adapter")
    args = parser.parse_args(argv)
    print(json.dumps(probe_run(args.run), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
