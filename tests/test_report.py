"""`magic report`: the pure parts against hand-computed values, the page on a fabricated run, partial runs."""

from __future__ import annotations

import json
import math
import re
from html.parser import HTMLParser
from types import SimpleNamespace

import pytest

from magic_align.evaluate.report import (
    collect_report,
    format_duration,
    format_estimate,
    pair_outcome_counts,
    parse_seconds,
    read_log_columns,
    run_report,
    smooth,
)
from report_run import ALPHA, BETA, EXPECTED, SECOND_JUDGE, build_report_run, expected_image_count

PAPER_DPO = "MAGIC-DPO (trajectory, as in the paper)"


# ------------------------------------------------------------------------------------------ page parsing
class _Tables(HTMLParser):
    """Tables of a page as lists of rows of cell texts, each with the heading (h2-h4) that precedes it."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[dict] = []
        self.heading = ""
        self._in_heading = False
        self._row: list[str] | None = None
        self._cell: list[str] | None = None
        self.images: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag in ("h2", "h3", "h4"):
            self._in_heading, self.heading = True, ""
        elif tag == "table":
            self.tables.append({"heading": self.heading.strip(), "rows": []})
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []
        elif tag == "img":
            self.images.append(dict(attrs).get("src", ""))
        if self._cell is not None and tag not in ("td", "th"):
            self._cell.append(" ")  # an inner element (a sub-line) is a word apart from the text before it

    def handle_endtag(self, tag):
        if tag in ("h2", "h3", "h4"):
            self._in_heading = False
        elif tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.tables[-1]["rows"].append(self._row)
            self._row = None

    def handle_data(self, data):
        if self._in_heading:
            self.heading += data
        if self._cell is not None:
            self._cell.append(data)


def parse(page: str) -> _Tables:
    parser = _Tables()
    parser.feed(page)
    return parser


def table_after(parsed: _Tables, heading_part: str) -> list[list[str]]:
    for table in parsed.tables:
        if heading_part in table["heading"]:
            return table["rows"]
    raise AssertionError(f"no table under a heading containing {heading_part!r}: {[t['heading'] for t in parsed.tables]}")


def row_starting(rows: list[list[str]], first: str) -> list[str]:
    for row in rows:
        if row and row[0].startswith(first):
            return row
    raise AssertionError(f"no row starting with {first!r} in {rows}")


# ------------------------------------------------------------------------------------------ pure parts
def test_format_estimate_and_numbers():
    assert format_estimate({"value": 0.7123, "low": 0.69, "high": 0.734}, 1, percent=True) == "71.2 [69.0, 73.4]"
    assert format_estimate({"value": 2.5, "low": float("nan"), "high": float("nan")}) == "2.50"  # one seed
    assert format_estimate({"value": float("nan"), "low": 0.1, "high": 0.2}) == "–"
    assert format_estimate(None) == "–"


def test_parse_seconds_and_duration():
    assert parse_seconds("12.5 s") == 12.5
    assert parse_seconds("8 s") == 8.0
    assert parse_seconds("8 images graded, 8 calls this run") is None
    assert format_duration(75) == "1 min 15 s"
    assert format_duration(3 * 3600 + 120) == "3 h 2 min"
    assert format_duration(None) == "–"


def test_pair_outcome_counts_by_hand():
    def pair(round_, a, b):
        return SimpleNamespace(round=round_, outcome_a=a, outcome_b=b, tie=a == b, source="judge")

    counts = pair_outcome_counts([pair(0, 1, 0), pair(0, 1, 1), pair(0, 0, 0), pair(0, 0, 0), pair(2, 0, 1)])
    assert [c["round"] for c in counts] == [0, 2]
    first = counts[0]
    assert (first["pairs"], first["one_wins"], first["both_win"], first["both_lose"], first["ties"]) == (4, 1, 1, 2, 3)
    assert first["signal_share"] == 0.25
    assert counts[1]["one_wins"] == 1 and counts[1]["signal_share"] == 1.0


def test_smooth_is_a_debiased_moving_average():
    assert smooth([2.0, 4.0], 0.5) == [2.0, pytest.approx((0.25 * 2 + 0.5 * 4) / 0.75)]
    values = smooth([1.0, float("nan"), 3.0], 0.0)  # weight 0: the value itself, NaN carries the last one
    assert values == [1.0, 1.0, 3.0]


def test_read_log_columns_tolerates_a_cut_off_row(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("step,loss,lr\n1,0.5,0.001\n2,0.25,x\n3,0.1")
    columns = read_log_columns(path)
    assert columns["step"] == [1.0, 2.0, 3.0]
    assert columns["loss"] == [0.5, 0.25, 0.1]
    assert columns["lr"][0] == 0.001 and math.isnan(columns["lr"][1]) and math.isnan(columns["lr"][2])


def test_read_log_columns_names_the_file_without_a_step_column(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("loss\n0.5\n")
    with pytest.raises(ValueError, match=r"metrics\.csv.*'step'"):
        read_log_columns(path)


# ------------------------------------------------------------------------------------------ full page
@pytest.fixture(scope="module")
def full_report(tmp_path_factory):
    """The full fabricated run and its page, built once for the tests that only read it."""
    config, paths = build_report_run(tmp_path_factory.mktemp("report"))
    output = run_report(config)
    return config, paths, output.read_text(encoding="utf-8")


def test_report_is_written_self_contained(full_report):
    config, paths, page = full_report
    assert (paths.report / "index.html").is_file()
    parsed = parse(page)
    assert len(parsed.images) == expected_image_count()
    assert all(src.startswith("data:image/") for src in parsed.images)
    # no external asset: no http(s) URL, stylesheet link or script anywhere
    assert not re.search(r"""(src|href)\s*=\s*["']https?:""", page)
    assert "<script" not in page and "<link" not in page
    assert "Problems reading the run" not in page


def test_report_numbers(full_report):
    config, paths, page = full_report
    parsed = parse(page)

    classifier = table_after(parsed, "small-cnn")
    assert row_starting(classifier, "real")[4] == EXPECTED["accuracy_real"]
    assert row_starting(classifier, "+ MAGIC-DPO")[4] == EXPECTED["accuracy_dpo"]
    skin = table_after(parsed, "skin type")
    assert skin[0][1:] == ["unknown n 4", "type 3 n 10"]  # unknown first (-1), each with its n
    assert row_starting(skin, "real")[2] == "66.0 [58.0, 74.0]"
    # per skin-type group: the locked set (stated figures) with paired differences, then the test split (tuning)
    locked = table_after(parsed, "skin-type group (%), locked set")
    assert locked[0][1:] == ["all", "types 3-4 n 12", "types 5-6 n 12", "Δ all vs real", "Δ types 3-4",
                             "Δ types 5-6"]
    assert row_starting(locked, "real")[1:] == ["61.2 [59.0, 63.4]", "50.0 [40.0, 60.0]", "30.0 [20.0, 40.0]",
                                                "–", "–", "–"]
    assert row_starting(locked, "+ MAGIC-DPO")[4:] == ["+3.4 [-1.0, +8.0]", "+0.0 [-5.0, +5.0]", "-2.0 [-6.0, +1.0]"]
    tuning = table_after(parsed, "skin-type group (%), test split")
    assert row_starting(tuning, "real")[1:3] == [EXPECTED["accuracy_real"], "66.0 [58.0, 74.0]"]
    assert "skipped: no aligned/rft" in page  # the skipped setting's note

    distances = table_after(parsed, "FID and KID")
    dpo = row_starting(distances, "MAGIC-DPO")
    assert (dpo[4], dpo[5]) == (EXPECTED["fid_dpo"], EXPECTED["kid_dpo"])

    synthetic = table_after(parsed, "Synthetic sets: manifest")
    assert synthetic[0][1:] == ["I2I, before alignment", PAPER_DPO]  # the tiny preset's objective (config.toml)
    assert row_starting(synthetic, "all conditions")[2].startswith(EXPECTED["passrate_dpo_share"])

    alignment = table_after(parsed, "Paired differences")
    assert row_starting(alignment, "dpo - i2i")[1:] == ["4", EXPECTED["alignment_difference"], "yes"]
    assert row_starting(alignment, "rft - i2i")[3] == "no"  # its interval contains 0
    assert "rft: trained on fewer units" in page  # the comparison's notes
    breakdown = table_after(parsed, "Where the difference comes from")
    assert row_starting(breakdown, "source skin types 1-2")[1:] == ["3", "+0.90 [+0.20, +1.50]", "+1.20 [+0.40, +2.00]"]
    assert row_starting(breakdown, "source skin types 5-6")[1:] == ["1", "-1.00 [-1.00, -1.00]", "–"]
    assert row_starting(breakdown, f"target {BETA}")[1:3] == ["4", "+0.45 [+0.20, +0.70]"]

    pairs = table_after(parsed, "Preference pairs")
    for round_index, (total, one, both_win, both_lose) in EXPECTED["pairs"].items():
        row = row_starting(pairs, str(round_index))
        assert [int(v) for v in row[1:5]] == [total, one, both_win, both_lose]
        assert int(row[5]) == both_win + both_lose

    usage = table_after(parsed, "Judge: cost and agreement")
    paid = row_starting(usage, SECOND_JUDGE)
    assert paid[1] == "8" and paid[6] == EXPECTED["tokens"] and paid[8] == EXPECTED["cost"]
    assert "configured judge" in row_starting(usage, "rules:")[0]

    stages = table_after(parsed, "Stages")
    assert row_starting(stages, "run:finetune")[2] == EXPECTED["stage_seconds"]
    assert row_starting(stages, "run:dpo/round-0")[1] == "failed"
    assert "name = &#34;report&#34;" in page or 'name = "report"' in page  # the resolved config


def test_round_pass_rates_match_hand_computation(full_report):
    config, paths, page = full_report
    parsed = parse(page)
    rounds = table_after(parsed, "Sampled images: rules:")
    assert rounds[0][1].startswith("round 0") and rounds[0][2].startswith("round 1")
    overall = row_starting(rounds, "all conditions")
    assert overall[1].startswith(EXPECTED["round0_share"] + " [")
    assert overall[2].startswith(EXPECTED["round1_share"])
    melanoma = row_starting(rounds, "Melanoma (demo)")
    assert melanoma[1].startswith(EXPECTED["round0_melanoma_share"] + " [")
    assert f"{EXPECTED['round0_melanoma_mean']} [" in melanoma[1]
    # the expert reviews and the second judge are graders of their own
    assert table_after(parsed, "Sampled images: human reviews")
    assert table_after(parsed, f"Sampled images: {SECOND_JUDGE}")


def test_agreement_tables(full_report):
    config, paths, page = full_report
    parsed = parse(page)
    human = table_after(parsed, "vs expert reviews")
    everything = row_starting(human, "all items")
    assert int(everything[1]) == 10  # two reviewed images x 5 items
    versus = table_after(parsed, f"vs {SECOND_JUDGE}")
    # the second judge differs from the configured one on exactly one of the 40 round-0 item answers
    assert row_starting(versus, "all items")[3].split(" ")[0] in ("0.97", "0.98")  # 39 / 40 = 0.975
    assert row_starting(versus, "all items")[1] == "40"


def test_grids_follow_the_alignment_units(full_report):
    config, paths, page = full_report
    assert page.count('class="condition"') == 2
    assert "Melanoma (demo)" in page and "Plaque psoriasis (demo)" in page
    assert "MAGIC-DPO" in page and "I2I, before alignment" in page


# ------------------------------------------------------------------------------------------ partial runs
def test_empty_run_says_what_is_missing(tmp_path):
    config, paths = build_report_run(tmp_path, ledger=False, evaluate=False, alignment=False, logs=False)
    page = run_report(config).read_text(encoding="utf-8")
    assert page.count("No data yet.") >= 8
    assert "magic evaluate" in page and "magic pairs" in page
    assert "<img" not in page
    assert "Problems reading the run" not in page
    assert 'name = "report"' in page or "name = &#34;report&#34;" in page  # the config is always there


def test_ledger_only_run(tmp_path):
    config, paths = build_report_run(tmp_path, evaluate=False, alignment=False, logs=False)
    context = collect_report(config)
    assert {"pairs", "judge_usage", "round_pass_rates", "stages", "agreement"} <= set(context.sections)
    assert {"grids", "classifier", "distances", "curves", "alignment"} <= set(context.missing)
    assert not context.problems


def test_grids_fall_back_to_the_synthetic_manifests(tmp_path):
    import csv

    from PIL import Image

    # the synthetic manifest's columns (DEVELOPERS.md); written here to keep torch (synthesize.py) out of the test
    columns = ["synthetic_id", "path", "source_id", "source_label", "source_group", "source_skin_type",
               "target_label", "prompt", "strength", "seed", "model_hash", "verdict_score", "verdict_items"]
    config, paths = build_report_run(tmp_path, ledger=False, evaluate=False, alignment=False, logs=False)
    for setting, colour in (("i2i", (10, 10, 10)), ("magic-dpo", (200, 10, 10))):
        rows = []
        for index in range(3):
            relative = f"synthetic/{setting}/images/syn-src{index}-0.png"
            (paths.root / relative).parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (16, 16), colour).save(paths.root / relative)
            rows.append({"synthetic_id": f"syn-src{index}-0", "path": relative, "source_id": f"src{index}",
                         "source_label": "", "target_label": ALPHA, "verdict_score": 4 if setting == "magic-dpo" else ""})
        with open(paths.synthetic / setting / "manifest.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns, restval="")
            writer.writeheader()
            writer.writerows(rows)
    context = collect_report(config, max_units_per_condition=2)
    grids = context.sections["grids"]
    assert grids["columns"] == ["I2I, before alignment", PAPER_DPO]
    (block,) = grids["conditions"]
    assert len(block["rows"]) == 2  # capped per condition
    assert [cell["score"] for cell in block["rows"][0]["cells"]] == [None, 4.0]
    assert all(cell["uri"].startswith("data:image/jpeg;base64,") for row in block["rows"] for cell in row["cells"])


def test_malformed_inputs_are_named_and_the_rest_is_kept(tmp_path):
    config, paths = build_report_run(tmp_path, logs=False)
    alignment = json.loads((paths.eval / "alignment.json").read_text())
    alignment["units"][1]["images"] = ["not", "an", "object"]
    (paths.eval / "alignment.json").write_text(json.dumps(alignment))
    (paths.root / "samples" / "round-0" / "images" / "u0-k0.png").unlink()  # not needed by the page
    (paths.root / "eval" / "alignment" / "dpo").rename(paths.root / "eval" / "alignment" / "gone")
    page = run_report(config).read_text(encoding="utf-8")
    assert "Problems reading the run" in page
    assert "units[1].images" in page and "expected an object" in page
    assert "71.2 [69.0, 73.4]" in page  # the classifier table is still there
    # without a valid alignment.json the grids come from manifests (none here): no broken image anywhere
    assert 'src=""' not in page

    # a missing image inside an otherwise valid file shows as "missing", never as a broken <img>
    alignment["units"][1]["images"] = {"i2i": "eval/alignment/i2i/u1.png", "dpo": "eval/alignment/dpo/u1.png"}
    (paths.eval / "alignment.json").write_text(json.dumps(alignment))
    page = run_report(config).read_text(encoding="utf-8")
    assert "eval/alignment/dpo/u1.png could not be embedded" in page
    assert ">missing<" in page


def test_bad_metrics_json_is_reported(tmp_path):
    config, paths = build_report_run(tmp_path, alignment=False, logs=False)
    (paths.eval / "metrics.json").write_text("{not json")
    context = collect_report(config)
    assert any("metrics.json is not valid JSON" in problem for problem in context.problems)
    assert "classifier" in context.missing and "pairs" in context.sections


def test_missing_run_directory_is_a_clear_error(tmp_path):
    from magic_align.config import load_config
    from magic_align.evaluate.report import ReportError

    config = load_config("tiny", [f"runs_dir='{tmp_path / 'nowhere'}'"])
    with pytest.raises(ReportError, match="does not exist"):
        run_report(config)


def test_cli_report(tmp_path):
    from typer.testing import CliRunner

    from magic_align.cli import app

    config, paths = build_report_run(tmp_path, ledger=False, evaluate=False, alignment=False)
    result = CliRunner().invoke(app, ["report", "tiny", "--set", f"runs_dir='{tmp_path / 'runs'}'",
                                      "--set", "name='report'"])
    assert result.exit_code == 0, result.output
    assert "index.html" in result.output
    assert "data:image/png;base64," in (paths.report / "index.html").read_text()


# ------------------------------------------------------------------------------------------ objectives
def test_results_are_labelled_by_the_objective_the_models_were_trained_with(tmp_path):
    config, paths = build_report_run(tmp_path, logs=False)
    # the trainers' summaries name the objective; they win over the run's config.toml (the paper's objectives)
    (paths.aligned / "dpo").mkdir(parents=True)
    (paths.aligned / "dpo" / "dpo.json").write_text(json.dumps({"round": 0, "objective": "denoising"}))
    (paths.aligned / "rft").mkdir(parents=True)
    (paths.aligned / "rft" / "rft.json").write_text(json.dumps({"objective": "denoising", "baseline": "unit"}))
    dpo, rft = "MAGIC-DPO (Diffusion-DPO objective)", "MAGIC-RFT (reward-weighted denoising, unit baseline)"
    parsed = parse(run_report(config).read_text(encoding="utf-8"))

    classifier = table_after(parsed, "small-cnn")
    assert row_starting(classifier, "+ " + dpo)[4] == EXPECTED["accuracy_dpo"]  # "+ MAGIC-DPO" in metrics.json
    assert row_starting(table_after(parsed, "FID and KID"), dpo)
    assert table_after(parsed, "Synthetic sets: manifest")[0][1:] == ["I2I, before alignment", dpo]
    settings = table_after(parsed, "Alignment comparison")
    assert row_starting(settings, dpo)[0].endswith(" dpo") and row_starting(settings, rft)[0].endswith(" rft")
    differences = table_after(parsed, "Paired differences")
    assert row_starting(differences, "dpo - i2i")[0] == f"dpo - i2i {dpo} vs I2I, before alignment"
    # no table names an aligned model without its objective
    cells = [cell for table in parsed.tables for row in table["rows"] for cell in row if "MAGIC-" in cell]
    assert cells and all(dpo in cell or rft in cell for cell in cells), cells


def test_the_label_magic_compare_recorded_is_kept(tmp_path):
    config, paths = build_report_run(tmp_path, logs=False, evaluate=False)
    alignment = json.loads((paths.eval / "alignment.json").read_text())
    alignment["settings"]["dpo"]["label"] = "MAGIC-DPO (Diffusion-DPO objective)"
    (paths.eval / "alignment.json").write_text(json.dumps(alignment))
    context = collect_report(config)
    labels = {row["name"]: row["label"] for row in context.sections["alignment"]["settings"]}
    assert labels["dpo"] == "MAGIC-DPO (Diffusion-DPO objective)"  # recorded, though config.toml says trajectory
    assert labels["rft"] == "MAGIC-RFT (reward-weighted trajectory, as in the paper)"  # not recorded: config.toml
    assert context.sections["grids"]["columns"][1] == "MAGIC-DPO (Diffusion-DPO objective)"


# ------------------------------------------------------------------------- independent measure and validity
def _add_independent_measure(paths, *, valid: bool, rft_recognition: dict) -> None:
    """eval/alignment.json as `magic compare` writes it with the recognition probe: the independent measure per
    model and difference, the KID per condition, and a validity table from images whose items follow (`valid`)
    or ignore recognition."""
    from magic_align.evaluate.validity import GradedImage, validity_table

    alignment = json.loads((paths.eval / "alignment.json").read_text())
    alignment["differences"]["rft - i2i"] = {"value": 0.6, "low": 0.2, "high": 1.0, "units": 4}
    alignment["independent"] = {
        "grader": "linear probe on small-cnn features, trained on 48 real training images (never on verdicts)",
        "real_test": {"n": 24, "accuracy": {"value": 0.875, "low": 0.75, "high": 1.0}},
        "settings": {name: {"recognised": {"value": share, "low": share - 0.1, "high": share + 0.1},
                            "target_probability": {"value": share - 0.05, "low": share - 0.1, "high": share}}
                     for name, share in (("i2i", 0.5), ("dpo", 0.6), ("rft", 0.4))},
        "differences": {"dpo - i2i": {"recognised": {"value": 0.1, "low": 0.02, "high": 0.18}},
                        "rft - i2i": {"recognised": rft_recognition}},
    }
    alignment["artefacts"] = {"measure": "KID per target condition",
                              "settings": {"i2i": {"kid": 0.0200}, "dpo": {"kid": 0.0250}, "rft": {"kid": 0.0150}},
                              # rft's change with the interval the comparison stores; dpo's is left to the values
                              "differences": {"rft - i2i": {"value": -0.005, "low": -0.0091, "high": -0.0012}}}
    met = [0, 1, 2, 3, 4, 5] * 4
    images = [GradedImage(ALPHA, (1,) * m + (0,) * (5 - m), int(m >= 3) if valid else index % 2)
              for index, m in enumerate(met)]
    alignment["validity"] = validity_table(images, None, resamples=100, seed=0, min_r=0.3)
    (paths.eval / "alignment.json").write_text(json.dumps(alignment))


def test_judge_gain_beside_the_independent_measure_and_no_warning_when_validity_is_high(tmp_path):
    config, paths = build_report_run(tmp_path, ledger=False, logs=False)
    _add_independent_measure(paths, valid=True, rft_recognition={"value": 0.01, "low": -0.05, "high": 0.07})
    page = run_report(config).read_text(encoding="utf-8")
    parsed = parse(page)
    assert "Read this first" not in page
    models = table_after(parsed, "Alignment comparison")
    assert row_starting(models, "I2I")[4:7] == ["50.0 [40.0, 60.0]", "0.450 [0.400, 0.500]", "0.0200"]
    differences = table_after(parsed, "Paired differences")
    dpo = row_starting(differences, "dpo - i2i")
    assert dpo[2:] == ["0.45 [0.20, 0.70]", "yes", "10.0 [2.0, 18.0]", "confirmed", "0.0050"]
    rft = row_starting(differences, "rft - i2i")
    assert rft[3:6] == ["yes", "1.0 [-5.0, 7.0]", "not confirmed"]
    assert rft[6] == "-0.0050 [-0.0091, -0.0012]"  # the KID change with its interval where one was stored
    validity = table_after(parsed, "Judge validity on generated images")
    overall = row_starting(validity, "all conditions")
    assert overall[1] == "24" and float(overall[5].split(" ")[0]) > 0.8
    assert "accuracy on real held-out images 87.5 [75.0, 100.0] %" in " ".join(page.split())


def test_low_validity_and_a_contradicted_gain_are_warned_on_the_first_screen(tmp_path):
    config, paths = build_report_run(tmp_path, ledger=False, logs=False)
    _add_independent_measure(paths, valid=False, rft_recognition={"value": -0.1, "low": -0.18, "high": -0.02})
    page = run_report(config).read_text(encoding="utf-8")
    assert "Read this first" in page
    warning = page.index("Read this first")
    assert warning < page.index('class="cards"') and warning < page.index('<section id="grids">')
    first_screen = " ".join(page[warning:page.index('class="cards"')].split())
    assert "validity on generated images is low" in first_screen
    assert "the share recognised as the target falls" in first_screen and "not shown as a gain" in first_screen
    rft = row_starting(table_after(parse(page), "Paired differences"), "rft - i2i")
    assert rft[3] == "yes, not shown as a gain" and rft[5] == "contradicted"

    # the threshold is today's setting: a high r is still warned about when the run asks for more
    from magic_align.config import load_config

    _add_independent_measure(paths, valid=True, rft_recognition={"value": 0.0, "low": -0.05, "high": 0.05})
    assert "Read this first" not in run_report(config).read_text(encoding="utf-8")
    strict = load_config("tiny", [f"runs_dir='{tmp_path / 'runs'}'", "name='report'", "evaluate.bootstrap=100",
                                  "judge.checklist='demo'", "evaluate.validity_min_r=0.99"])
    assert "validity on generated images is low" in run_report(strict).read_text(encoding="utf-8")


def test_first_screen_cards_state_paired_differences_and_the_locked_accuracy(tmp_path):
    config, paths = build_report_run(tmp_path, ledger=False, logs=False)
    _add_independent_measure(paths, valid=True, rft_recognition={"value": 0.01, "low": -0.05, "high": 0.07})
    page = run_report(config).read_text(encoding="utf-8")
    cards = " ".join(page[page.index('class="cards"'):page.index('<section id="grids">')].split())
    assert "+0.45 [+0.20, +0.70]" in cards  # items met: a signed paired difference
    assert "+10.0 [+2.0, +18.0] pts" in cards  # recognition in percentage points, not a fraction
    metrics = json.loads((paths.eval / "metrics.json").read_text())
    rows = {row["setting"]: row for row in metrics["classifier"] if row.get("group", "full") == "full"}
    real, best = rows["real"]["locked"]["accuracy"]["value"], max(
        row["locked"]["accuracy"]["value"] for name, row in rows.items() if name != "real")
    assert "accuracy on the locked set" in cards
    assert f"{100 * real:.1f} → {100 * best:.1f} %" in cards
