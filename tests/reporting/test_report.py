"""The report: Markdown + self-contained HTML with every section, embedded PNGs, visible warnings."""

from __future__ import annotations

import base64
import json
import re

import pytest
from results.fabricate import class_record, write_run, write_sweep

from fimlora.analysis.calibration import CalibrationStability, SubsetScores, compare_subsets
from fimlora.cli import main
from fimlora.reporting import build_report
from fimlora.reporting.document import Notice, Table, render_html, render_markdown

SECTIONS = (
    "Results over seeds",
    "Accuracy–size trade-off",
    "Rank allocations",
    "Fisher importance",
    "Training curves",
    "Calibration size: how stable is the Fisher ranking?",
    "How to read the statistics",
    "Unfinished runs",
)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _calibration(tmp_path):
    kinds = ("query", "key", "value")
    scores = {
        f"bert.encoder.layer.{i}.attention.self.{k}": float(i + j)
        for i in range(2)
        for j, k in enumerate(kinds)
    }
    entries = []
    for size in (4, 16):
        for subset in range(3):
            for estimator in ("empirical", "mc"):
                # Small subsets disagree a little (alternating perturbation), large ones not at all.
                shift = 0.5 * subset if size == 4 else 0.0
                noisy = {n: v + shift * (-1) ** i for i, (n, v) in enumerate(scores.items())}
                entries.append(SubsetScores(size, subset, estimator, {"mean": noisy, "trace": noisy}))
    info = {
        "model": "tiny-bert",
        "dataset": "reviews",
        "seed": 0,
        "sizes": [4, 16],
        "repeats": 3,
        "aggregation": "mean",
        "num_modules": 6,
        "k": 2,
    }
    CalibrationStability(info, compare_subsets(entries, k=2), entries).write(tmp_path / "calibration")


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("report-runs")
    write_sweep(root / "sweep", seeds=(0, 1, 2, 3, 4), ranks=(2, 4), eval_losses=True)
    # A second model with only 3 seeds: its rows must carry the < 5 seeds warning.
    for seed in range(3):
        for method in ("lora", "fim-lora"):
            accuracy = 0.6 + 0.01 * seed + (0.02 if method == "fim-lora" else 0)
            path = root / "small" / f"s{seed}" / method
            write_run(path, method=method, seed=seed, model="other-bert", accuracy=accuracy)
    write_run(root / "small" / "s3" / "lora", method="lora", seed=3, model="other-bert", finished=False)
    _calibration(root)
    files = build_report(root, n_resamples=10_000)
    return root, files


def test_markdown_has_every_section_and_links_existing_pngs(report_dir):
    root, files = report_dir
    markdown = files.markdown.read_text(encoding="utf-8")
    for section in SECTIONS:
        assert section in markdown, section
    links = re.findall(r"!\[[^\]]*\]\((report_files/[^)]+\.png)\)", markdown)
    assert len(links) == len(files.images) >= 8
    for link in links:
        assert (root / link).read_bytes().startswith(PNG_SIGNATURE)
    assert "reviews / tiny-bert (classification)" in markdown and "reviews / other-bert" in markdown
    assert "small/s3/lora" in markdown  # the unfinished run is listed, not reported
    assert (root / "report_files" / "summary.csv").is_file()
    # tiny-bert has two budgets, other-bert one: one savings table, r2's three methods against lora r4.
    assert markdown.count("Savings: smaller budgets against lora at a larger one") == 1
    savings_part = markdown.split("Savings: smaller budgets")[1].split("\n#")[0]
    assert len(re.findall(r"^\| r=2 \| (lora|fim-lora|random-rank) \|", savings_part, flags=re.M)) == 3


def test_html_is_self_contained_with_embedded_images(report_dir):
    _, files = report_dir
    html = files.html.read_text(encoding="utf-8")
    for section in SECTIONS:
        assert section in html, section
    images = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(images) == len(files.images)
    assert all(base64.b64decode(data).startswith(PNG_SIGNATURE) for data in images)
    assert "<style>" in html and "<script" not in html
    assert not re.search(r"(src|href)=\"(https?:)?//", html) and "@import" not in html
    assert "url(" not in html


def test_fewer_than_five_seeds_warning_is_visible(report_dir):
    _, files = report_dir
    html = files.html.read_text(encoding="utf-8")
    markdown = files.markdown.read_text(encoding="utf-8")
    assert "⚠ only 3 seeds (&lt; 5)" in html and '<tr class="warn">' in html
    assert "⚠ only 3 seeds (< 5)" in markdown
    assert "Fewer than 5 seeds back" in markdown
    # The five-seed sweep's rows carry no warning: its table rows are plain.
    sweep_rows = [line for line in markdown.splitlines() if line.startswith("| r=2 | fim-lora | 5 |")]
    assert sweep_rows and all("⚠" not in line for line in sweep_rows)


def test_paired_comparison_is_reported(report_dir):
    _, files = report_dir
    markdown = files.markdown.read_text(encoding="utf-8")
    # fim-lora − lora on the sweep = 0.01 + 0.002·(seed mod 2): mean +0.0108; exact sign-flip p = 2/32;
    # t-interval: sd = 0.0010954, 0.0108 ± 2.776445 · 0.0010954 / √5 = [0.00944, 0.01216].
    row = next(line for line in markdown.splitlines() if line.startswith("| r=4 | fim-lora | 5 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[6] == "+0.0108" and cells[8] == "[+0.0094, +0.0122]"
    # Holm over the table's 4 comparisons (fim-lora and random-rank at r=2 and r=4): the four sign-flip
    # p-values are all 2/32, so each is adjusted to 4 · 2/32 = 0.25; the t-test's are far below 0.05.
    assert cells[10] == "0.062 (0.250)" and cells[9].startswith("<0.001 (<0.001)")
    assert "Holm's adjustment in brackets, over this table's 4 comparisons with lora" in markdown
    findings = [line for line in markdown.splitlines() if line.startswith("Findings on accuracy")]
    small, sweep = findings  # other-bert (3 seeds) sorts before tiny-bert
    assert "over this table's 4 comparisons (paired t-test, ≥ 5 paired seeds)" in sweep
    assert "r=4 fim-lora: Δ +0.0108, p <0.001, Holm <0.001, sign-flip Holm 0.250" in sweep
    # other-bert: fim-lora is +0.02 on each of 3 seeds (t = ∞, p = 0): below 0.05, but 3 seeds are no
    # evidence, so it is named and not called a finding.
    assert "over this table's 1 comparison" in small and ": none; no difference in this table" in small
    assert "on fewer than 5 paired seeds, so not findings: r=4 fim-lora: Δ +0.0200" in small


def test_a_per_budget_holm_family_is_reported_as_such(report_dir, tmp_path, capsys):
    root, _ = report_dir
    out = tmp_path / "per-budget"
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(root / "sweep"), "--out", str(out), "--holm-family", "budget"])
    assert exit_info.value.code == 0
    markdown = (out / "report.md").read_text(encoding="utf-8")
    # Two comparisons per budget (fim-lora and random-rank), each budget adjusted on its own: the
    # sign-flip p of 2/32 becomes 2 · 2/32 = 0.125, not the 0.25 of the table's family of 4.
    row = next(line for line in markdown.splitlines() if line.startswith("| r=4 | fim-lora | 5 |"))
    assert [c.strip() for c in row.strip("|").split("|")][10] == "0.062 (0.125)"
    assert "over each budget's comparisons on their own (r=2: 2, r=4: 2) with lora" in markdown
    assert "after Holm's correction over each budget's comparisons on their own (r=2: 2, r=4: 2)" in markdown
    assert "the family of its budget" in markdown and "this table's 4" not in markdown
    assert "Holm's adjustment over each pair of budgets' comparisons on their own (r=2 vs r=4: " in markdown
    # A family the tool does not know: refused before anything is written.
    refused = tmp_path / "refused"
    with pytest.raises(SystemExit) as exit_info:
        main(["results", str(root / "sweep"), "--out", str(refused), "--holm-family", "cell"])
    assert exit_info.value.code != 0 and not refused.exists()
    assert "Unknown Holm family 'cell'; choose one of table, budget" in capsys.readouterr().err


def test_report_is_deterministic(report_dir, tmp_path):
    root, files = report_dir
    again = build_report(root, tmp_path / "again", n_resamples=10_000)
    assert again.html.read_bytes() == files.html.read_bytes()
    assert [p.read_bytes() for p in again.images] == [p.read_bytes() for p in files.images]


def test_renderers_escape_and_mark_warnings():
    blocks = [Notice("a <b> & c"), Table(["x|y", "z"], [["1|2", "<i>"]], warn_rows={0})]
    html = render_html(blocks, title="t")
    assert "a &lt;b&gt; &amp; c" in html and "&lt;i&gt;" in html and '<tr class="warn">' in html
    markdown = render_markdown(blocks, files_dir="f")
    assert "> ⚠ a <b> & c" in markdown and "| x\\|y | z |" in markdown and "| 1\\|2 |" in markdown


def test_cli_report(capsys, report_dir, tmp_path):
    root, _ = report_dir
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(root / "small"), "--out", str(tmp_path / "r"), "--metric", "macro_f1"])
    captured = capsys.readouterr()
    assert exit_info.value.code == 0, captured.err
    assert (tmp_path / "r" / "report.html").is_file() and "report:" in captured.out
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(root / "small"), "--metric", "perplexity"])
    assert exit_info.value.code == 2 and "perplexity" in capsys.readouterr().err


def test_a_report_it_did_not_write_is_never_replaced(capsys, report_dir, tmp_path):
    root, files = report_dir
    out = tmp_path / "demo"
    out.mkdir()
    (out / "report.md").write_text("# fimlora demo\n\nthe demo's own summary\n", encoding="utf-8")
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(root / "small"), "--out", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "was not written by fimlora report" in err and "--out" in err and "Traceback" not in err
    assert (out / "report.md").read_text(encoding="utf-8").startswith("# fimlora demo")
    assert not (out / "report.html").exists() and not (out / "report_files").exists()
    again = build_report(root, files.markdown.parent, n_resamples=10_000)  # its own report: replaced
    assert again.markdown.read_text(encoding="utf-8").startswith("# fimlora report: ")


def test_rank_heatmaps_show_the_ranks_adaptive_methods_end_with(tmp_path):
    root = tmp_path / "runs"
    write_run(root / "fim" / "fim-lora", method="fim-lora", seed=0)
    adaptive = {}
    for method, key in (("adalora", "final_ranks"), ("eva", "redistributed_ranks")):
        run = write_run(root / method / method, method="lora", seed=0)  # uniform initial allocation
        ranks = json.loads((run / "allocation.json").read_text())["ranks"]
        ranks = {name: (i % 3) * 3 for i, name in enumerate(ranks)}
        result = json.loads((run / "result.json").read_text())
        result.update(method=method, records={method: {key: ranks}})
        (run / "result.json").write_text(json.dumps(result))
        adaptive[method] = ranks
    text = build_report(root, n_resamples=10_000).markdown.read_text(encoding="utf-8")
    caption = next(line for line in text.splitlines() if line.startswith("*Budget r=4"))
    assert "adalora: seed 0" in caption and "eva: seed 0" in caption and "fim-lora: seed 0" in caption
    assert "Not shown" not in caption  # neither is reported as its uniform initial allocation


def test_rank_trajectories_are_drawn_for_methods_whose_ranks_move(tmp_path):
    root = tmp_path / "runs"
    write_run(root / "fim" / "fim-lora", method="fim-lora", seed=0)
    histories = {}
    for method, record_key, rank_key in (
        ("adalora", "adalora", "final_ranks"),
        ("fim-lora-dynamic", "fisher_online", "reallocated_ranks"),
    ):
        run = write_run(root / method / method, method="lora", seed=0)
        names = list(json.loads((run / "allocation.json").read_text())["ranks"])
        history = [
            {"step": step, "ranks": {name: 1 + (i + step) % 5 for i, name in enumerate(names)}}
            for step in (0, 4, 12)
        ]
        result = json.loads((run / "result.json").read_text())
        result.update(
            method=method, records={record_key: {"rank_history": history, rank_key: history[-1]["ranks"]}}
        )
        (run / "result.json").write_text(json.dumps(result))
        histories[method] = history
    files = build_report(root, n_resamples=10_000)
    text = files.markdown.read_text(encoding="utf-8")
    assert "Ranks during training" in text
    drawn = sorted(p.name for p in files.images if p.name.startswith("rank-trajectories-"))
    assert len(drawn) == 2
    assert any("adalora" in n for n in drawn) and any("fim-lora-dynamic" in n for n in drawn)
    captions = [line for line in text.splitlines() if line.startswith("*Rank of each module over training")]
    assert len(captions) == 2 and all("recorded at 3 points" in c for c in captions)
    from fimlora.runs import rank_history

    result = json.loads((root / "fim-lora-dynamic" / "fim-lora-dynamic" / "result.json").read_text())
    assert rank_history(result) == [(e["step"], e["ranks"]) for e in histories["fim-lora-dynamic"]]
    static = json.loads((root / "fim" / "fim-lora" / "result.json").read_text())
    assert rank_history(static) is None


def test_per_class_results_show_what_accuracy_hides(tmp_path):
    """Accuracy 0.53 with a class never predicted: the majority rate, per-class recall and precision and
    the confusion matrix say so."""
    root = tmp_path / "runs"
    labels = ["neg", "neutral", "pos"]
    for seed in range(2):
        write_run(
            root / f"s{seed}" / "lora",
            method="lora",
            seed=seed,
            accuracy=0.7,
            classes=class_record([[8, 1, 1], [1, 7, 2], [1, 1, 8]], labels),
        )
        write_run(
            root / f"s{seed}" / "fim-lora",
            method="fim-lora",
            seed=seed,
            accuracy=0.53,
            classes=class_record([[9, 0, 1], [6, 0, 4], [3, 0, 7]], labels),
        )
    text = build_report(root, n_resamples=10_000).markdown.read_text(encoding="utf-8")
    assert "always predicting the split's most frequent class scores 0.333" in text
    assert "| r=4 | fim-lora | 2 | 0.900 | 0.000 | 0.700 | ⚠ never predicts neutral (2 of 2 runs) |" in text
    assert "| r=4 | lora | 2 | 0.800 | 0.700 | 0.800 |  |" in text
    assert "| r=4 | fim-lora | 2 | 0.500 | 0.000 | 0.583 |" in text  # precision: 9/18, 0 (never), 7/12
    assert "r=4, fim-lora (2 run(s)) — true neg: 18 neg, 0 neutral, 2 pos; true neutral: 12 neg" in text


def test_without_baseline_runs_the_default_is_a_notice_and_an_explicit_one_an_error(capsys, tmp_path):
    root = tmp_path / "runs"
    for seed in range(2):
        write_run(root / f"s{seed}" / "fim-lora", method="fim-lora", seed=seed)
    text = build_report(root, n_resamples=10_000).markdown.read_text(encoding="utf-8")
    assert "No run of `lora` below this directory, so there are no paired comparisons" in text
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(root), "--out", str(tmp_path / "r"), "--baseline", "dora"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "'dora'" in err and "fim-lora" in err
    assert not (tmp_path / "r" / "report.md").exists()


def test_the_primary_metric_follows_tuning(tmp_path):
    write_sweep(tmp_path / "sweep", seeds=(0, 1, 2, 3, 4), ranks=(2, 4))
    for path in tmp_path.rglob("result.json"):
        result = json.loads(path.read_text(encoding="utf-8"))
        result["tuning"] = {"metric": "macro_f1", "validation_score": 0.5}
        path.write_text(json.dumps(result), encoding="utf-8")
    markdown = build_report(tmp_path, n_resamples=10_000).markdown.read_text(encoding="utf-8")
    results = markdown.split("### Results over seeds")[1]
    # The macro-F1 table comes first and is the primary one; the savings table is on macro-F1 too.
    assert results.index("*macro_f1 on the held-out split") < results.index("*accuracy on the held-out split")
    assert "primary metric, the one these runs were tuned on" in markdown
    assert "*macro_f1: each method at a budget minus lora at a larger budget" in markdown
