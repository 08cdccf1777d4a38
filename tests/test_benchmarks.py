"""The benchmark suite keeps running (a --quick smoke run; no timing is asserted), and the
solver and extraction paths it measures keep their results."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from probekit.engine.probes import fit_probe, fit_probes, score, standardiser

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_quick_benchmark_run_writes_every_figure(tmp_path):
    """Every figure of one process at --quick size (figures 10 and 11, which start many processes, have tests of their
    own below)."""
    out = tmp_path / "quick.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--only", "1,2,3,4,5,6,8", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
        timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    figures = {row["figure"].split()[0] for row in result["rows"]}
    assert figures == {"1", "2", "3", "4", "5", "6", "8"}
    for row in result["rows"]:
        assert row["baseline_value"] > 0 and row["probekit_value"] > 0, row
        assert math.isfinite(row["ratio"]), row
    assert result["machine"]["cores"] and result["load_average"]
    assert "ratio" in proc.stdout and f"wrote {out}" in proc.stdout


@pytest.mark.slow
def test_many_runs_figure_runs_at_quick_size(tmp_path):
    """Figure 10 alone at --quick size: eight runs as a sweep on a LocalCluster against the same runs one by one."""
    out = tmp_path / "sweep.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--only", "10", "--out", str(out)], cwd=ROOT,
        capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert row["figure"] == "10 sweep" and row["case"].startswith("8 runs, paper convnet")
    assert row["baseline_value"] > 0 and row["probekit_value"] > 0 and math.isfinite(row["ratio"])
    assert "cells done: 8/8 sweep, 8/8 one after another" in row["note"]


@pytest.mark.slow
def test_gpu_script_runs_end_to_end_on_the_cpu(tmp_path):
    """benchmarks/gpu.sh --smoke, at toy size on the CPU (the script passes --device cpu without its CUDA check),
    so that the GPU script cannot rot unseen: every row kind is there with a finite value."""
    out = tmp_path / "gpu.json"
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--smoke", "--device", "cpu", "--batch", "2", "--reps", "1",
         "--fit-examples", "200", "--e2e-images", "12", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHON": sys.executable},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert result["smoke"] and result["sizes"] == {"batch": 2, "reps": 1, "fit_examples": 200, "e2e_images": 12}
    assert [row["figure"] for row in rows] == ["7 gpu"] * 7
    assert [row["kind"] for row in rows] == ["extraction"] * 2 + ["fitting", "agreement", "fitting", "fitting",
                                                                  "end-to-end"]
    assert all(math.isfinite(row["probekit_value"]) and row["probekit_value"] > 0 for row in rows)
    (agreement,) = [row for row in rows if row["kind"] == "agreement"]
    assert agreement["gap_pt"] == 0 and agreement["target_pt"] == 0.5  # cpu against cpu: the same fit
    for row in rows:
        if row["kind"] != "fitting":
            assert math.isfinite(row["baseline_value"]) and math.isfinite(row["ratio"]), row
    (e2e,) = [row for row in rows if row["kind"] == "end-to-end"]
    assert e2e["target"] == 1.3 and e2e["layers"] == 17 and (e2e["train"], e2e["valid"]) == (10, 2)
    assert all(math.isfinite(e2e[side]) for side in ("bare_s", "probekit_s", "bare_fp32_s"))
    assert [row["target"] for row in rows if row["kind"] == "extraction"] == [1.10, 1.10]
    assert "ratio" in proc.stdout and f"wrote {out}" in proc.stdout


@pytest.mark.slow
def test_distributed_figure_runs_at_toy_size(tmp_path):
    """benchmarks.distributed at quick size: 1 process against 2 under torchrun (gloo), its rows and their cost."""
    out = tmp_path / "quick.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--only", "11", "--out", str(out)], cwd=ROOT, capture_output=True,
        text=True, timeout=900, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [row["baseline"] for row in rows] == ["1 process x 1 thread", "1 process x 2 threads", "2-process call"]
    for row in rows:
        assert row["baseline_value"] > 0 and row["probekit_value"] > 0 and math.isfinite(row["ratio"]), row
    assert rows[0]["two"]["world_size"] == 2 and rows[0]["one"]["world_size"] == 1
    assert rows[0]["error_gap_examples"] >= 0


@pytest.mark.slow
def test_sklearn_pipeline_comparison_runs_end_to_end(tmp_path):
    """benchmarks.sklearn_pipeline at toy size: one row with a per-layer table of both sides' errors."""
    out = tmp_path / "sklearn.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.sklearn_pipeline", "--train", "120", "--reps", "1", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert row["figure"] == "9 sklearn pipeline" and math.isfinite(row["ratio"]) and row["probekit_value"] > 0
    layers = row["layers"]
    assert [r["layer"] for r in layers] == [f"layer{s}.{b}" for s in range(1, 5) for b in range(2)]
    for r in layers:
        for side in ("sklearn", "probekit", "probekit_l2_1e-3", "sklearn_scaled"):
            assert 0 <= r[side] <= 1, r
    assert row["mean_gap"] == pytest.approx(np.mean([r["probekit"] - r["sklearn"] for r in layers]))
    assert "| layer | reduce | l2 |" in proc.stdout


def test_sweep_prints_its_table():
    proc = subprocess.run([sys.executable, "-m", "benchmarks.sweep", "--only", "gpt2,distilbert"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert [cell.strip() for cell in lines[0].split("|")] == [
        "model", "default points", "blocks present", "seconds", "state unchanged"]
    rows = {line.split("|")[0].strip(): [cell.strip() for cell in line.split("|")[1:]] for line in lines[1:3]}
    assert set(rows) == {"transformers:GPT2Model", "transformers:DistilBertModel"}
    for points, blocks, seconds, unchanged in rows.values():
        assert int(points) >= 3 and blocks == "2/2" and float(seconds) > 0 and unchanged == "yes"
    assert lines[-1].startswith("2 models")
    unknown = subprocess.run([sys.executable, "-m", "benchmarks.sweep", "--only", "nothing"], cwd=ROOT,
                             capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert unknown.returncode == 2 and "no model of the sweep matches 'nothing'" in unknown.stderr


def test_benchmark_entry_point_refuses_an_unknown_figure():
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--only", "9"], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2 and "unknown figure(s) ['9']" in proc.stderr


# ------------------------------------------------------------------ what the figures rely on
def _problem(n=600, d=300, classes=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    latent = torch.randn(n, 16, generator=generator) + 0.8 * torch.randn(classes, 16, generator=generator)[y]
    x = torch.relu(latent @ torch.randn(16, d, generator=generator) + 0.3 * torch.randn(n, d, generator=generator))
    return x, y


def test_batched_and_parallel_fits_equal_one_by_one_fits():
    x1, y = _problem(d=300)
    x2, _ = _problem(d=40, seed=1)
    together = fit_probes({"a": x1, "b": x2}, y, 4)
    for name, x in (("a", x1), ("b", x2)):
        alone = fit_probe(x, y, 4)
        torch.testing.assert_close(together[name].weight, alone.weight, rtol=1e-4, atol=1e-5)
        assert together[name].converged and together[name].iterations == alone.iterations
    threads = torch.get_num_threads()
    assert list(together) == ["a", "b"]
    fit_probes({"a": x1, "b": x2}, y, 4)
    assert torch.get_num_threads() == threads  # the solver's single-threaded workers leave the setting as it was


def test_solver_reaches_the_optimum_whatever_the_preconditioner():
    """The preconditioned solve stops on the true gradient and reaches the objective value
    of scikit-learn run to a tight tolerance, on correlated features where it matters."""
    from sklearn.linear_model import LogisticRegression

    x, y = _problem(n=800, d=256)
    l2 = 1e-3
    fit = fit_probe(x, y, 4, l2=l2, tol=1e-6)
    assert fit.converged
    mean, scale = standardiser(x)
    z = ((x - mean) / scale).double()
    reference = LogisticRegression(C=1 / (len(y) * l2), tol=1e-10, max_iter=10_000).fit(z.numpy(), y.numpy())

    def objective(weight, bias):  # mean cross-entropy + l2 / 2 ||W||^2, in float64
        logits = z @ weight + bias
        return float(torch.nn.functional.cross_entropy(logits, y) + 0.5 * l2 * weight.pow(2).sum())

    ours = objective(fit.weight.double(), fit.bias.double())
    best = objective(torch.from_numpy(reference.coef_.T), torch.from_numpy(reference.intercept_))
    assert ours == pytest.approx(best, rel=1e-5)
    assert score(fit.logits, x, y, 4)["error"] == pytest.approx(1 - reference.score(z.numpy(), y.numpy()), abs=2e-3)


def test_standardiser_matches_the_two_pass_formula():
    x = torch.randn(3000, 50, dtype=torch.float64) * 3 + 100
    x[:, 7] = 2.0  # a constant feature keeps scale 1
    mean, scale = standardiser(x)
    np.testing.assert_allclose(mean.numpy(), x.mean(0).numpy(), rtol=1e-12)
    expected = x.std(0, unbiased=False).numpy()
    expected[7] = 1.0
    np.testing.assert_allclose(scale.numpy(), expected, rtol=1e-10)


def test_extraction_under_bf16_autocast_caches_float32_features(digits_tensors):
    from probekit.engine import plan
    from probekit.engine.extract import build_extractor
    from probekit.engine.features import extract
    from tests.conftest import tiny_convnet

    model = tiny_convnet().eval()
    x, y = digits_tensors["valid"]
    probe_plan = plan(model, x[:2], layers="all")
    extractor = build_extractor(probe_plan.graph, probe_plan.reducers)
    dims = {n: r.out_features for n, r in probe_plan.reducers.items()}
    common = dict(name="valid", dims=dims, num_classes=10, batch_size=128, device=torch.device("cpu"))
    exact = extract(extractor, (x, y), **common)
    mixed = extract(extractor, (x, y), autocast=torch.bfloat16, **common)
    for name in dims:
        assert mixed.features[name].dtype == torch.float32
        torch.testing.assert_close(mixed.features[name], exact.features[name], rtol=0.05, atol=0.05)
    assert not any(mixed.nonfinite.values())


def test_nonfinite_check_flags_nan_and_inf_but_not_large_values():
    from probekit.engine.features import extract

    values = {"big": torch.full((4, 3), 3e38), "nan": torch.tensor([[0.0, float("nan")]] * 4),
              "inf": torch.tensor([[float("inf"), 1.0]] * 4)}
    cached = extract(lambda x: dict(values), (torch.zeros(4, 1), torch.arange(4) % 2), name="valid",
                     dims={k: v.shape[1] for k, v in values.items()}, num_classes=2, batch_size=4,
                     device=torch.device("cpu"))
    assert cached.nonfinite == {"big": False, "nan": True, "inf": True}


def test_in_place_residual_adds_change_no_probed_value():
    """The extractor adds residuals in place (as the model does); values probes read stay exact."""
    import torchvision

    from probekit.engine import plan
    from probekit.engine.extract import build_extractor

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    names = ["layer1.0.bn2", "layer1.0", "layer2.0", "layer4.1"]  # bn2 feeds layer1.0's add: it must not change
    probe_plan = plan(model, x, layers=names, reduce="flatten")
    extractor = build_extractor(probe_plan.graph, probe_plan.reducers)
    seen = {}
    hooks = [model.get_submodule(n).register_forward_hook(lambda m, a, out, n=n: seen.__setitem__(n, out.clone()))
             for n in names]
    try:
        with torch.no_grad():
            model(x)
            out = extractor(x)
    finally:
        for hook in hooks:
            hook.remove()
    for name in names:
        torch.testing.assert_close(out[name], seen[name].flatten(1))
