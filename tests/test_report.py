"""The run report: what generation records for it, the page's data and size, --report-only and --merge,
and the page itself in headless Chromium (skipped, with the reason, where no browser is installed)."""

from __future__ import annotations

import base64
import gzip
import json
import re
import shutil
from pathlib import Path

import polars as pl
import pytest

from sieve.report import REPORT_NAME, load_run, token_ends
from tests.conftest import import_re_feature

ROOT = Path(__file__).resolve().parents[1]
HOSTILE = '</script><script>document.title="owned"</script> & <b>bold</b>'
METHODS = '["unsteered","constant_sae","conditional_per_token","conditional_per_input"]'


RECIPE = ROOT / "recipes/regex_lexical.toml"  # imports kept in the prompts; 4 add scales


def _overrides(out: Path) -> list[str]:
    k, thr = import_re_feature()  # a gate that opens on the `import re` of the lexical prompts
    return [f"sweep.methods={METHODS}", "sweep.samples=2", "sweep.max_new_tokens=12", "prompts.regex_limit=4",
            "prompts.neutral_limit=2", "prompts.code_limit=4", f'output.dir="{out}"', "output.charts=false",
            f"description={json.dumps(HOSTILE)}", f"sae.feature={k}", f"sae.threshold={thr!r}"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A small real run of the regex recipe on the embedded world, as two shards merged into one."""
    from recipes import regex

    base = tmp_path_factory.mktemp("reportrun")
    out = base / "merged"
    recipe = str(RECIPE)
    for i in range(2):
        assert regex.main([recipe, *_overrides(out), f"--shard={i}/2", f"--out={base / f's{i}'}", "--no-progress"]) == 0
        assert not (base / f"s{i}" / REPORT_NAME).exists()  # a shard alone is not the run
    assert regex.main([recipe, *_overrides(out), "--merge", str(base / "s0"), str(base / "s1"), "--no-progress"]) == 0
    return out


def _gen(run_dir: Path) -> pl.DataFrame:
    from sieve.results import ResultStore

    return ResultStore(run_dir / "gen").table()


def _packed(html: str) -> str:
    return re.search(r'<script type="text/plain" id="packed">(.*?)</script>', html, re.S).group(1)


def _meta(html: str) -> dict:
    m = re.search(r'<script type="application/json" id="meta">(.*?)</script>', html, re.S)
    assert m, "no meta block"
    return json.loads(m.group(1))


def test_positions_agree_with_counts(run_dir):
    gen = _gen(run_dir)
    assert gen.height == (1 + 3 * 4) * (4 + 2) * 2  # cells (unsteered + 3 methods x 4 scales) x prompts x samples
    for r in gen.iter_rows(named=True):
        assert len(r["prompt_fired_at"]) == r["prompt_fired"], r["key"]
        assert len(r["gen_fired_at"]) == r["gen_fired"], r["key"]
        assert len(r["gen_edited_at"]) == r["gen_edited"], r["key"]
        assert all(0 <= j < r["n_tokens"] for j in r["gen_fired_at"] + r["gen_edited_at"])
        ends = r["token_ends"]
        assert len(ends) == r["n_tokens"] and ends == sorted(ends) and (not ends or ends[-1] == len(r["text"]))
        if r["method"] == "constant_sae":
            # Every kept token that a later forward read was edited: 0..k-1, k = n or n-1 (the last is never read).
            k = len(r["gen_edited_at"])
            assert r["gen_edited_at"] == list(range(k)) and k in (r["n_tokens"], r["n_tokens"] - 1)
        if r["method"] == "unsteered":
            assert not (r["gen_fired_at"] or r["gen_edited_at"] or r["prompt_fired_at"])
    # The latent fires on the regex-prone prompts (they import re): the positions are not all empty.
    assert gen.filter(pl.col("method") == "conditional_per_token")["prompt_fired"].sum() > 0


def test_prompt_table_matches_the_prompts(run_dir):
    prompts = pl.read_parquet(run_dir / "prompts.parquet")
    assert sorted(set(prompts["set"])) == ["neutral", "regex"] and prompts.height == 6
    for r in prompts.iter_rows(named=True):
        assert r["token_ends"][-1] == len(r["text"]) and r["token_ends"] == sorted(r["token_ends"])
    gen = _gen(run_dir)
    pf = gen.filter(pl.col("method") == "conditional_per_token").join(
        prompts.select("set", "prompt_index", pl.col("token_ends").alias("prompt_ends")), on=["set", "prompt_index"])
    assert pf.height and all(all(j < len(e) for j in at) for at, e in zip(pf["prompt_fired_at"], pf["prompt_ends"]))


def test_token_ends_split_characters():
    from sieve.world import load_world

    tok = load_world().model.tokenizer
    text = "def f():\n    return 'ünïcødé ✓ 😀'\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    (ends,) = token_ends(tok, [ids])
    assert len(ends) == len(ids) and ends == sorted(ends) and ends[-1] == len(tok.decode(ids))
    # Where a token ends inside a character (byte-level BPE), its end stays where the text stands.
    whole = [tok.decode(ids[: i + 1]) for i in range(len(ids))]
    assert all(e == len(w) for e, w in zip(ends, whole) if "\ufffd" not in w)


def test_merged_run_gives_one_report(run_dir):
    html = (run_dir / REPORT_NAME).read_text()
    meta = _meta(html)
    run = load_run(run_dir)
    assert meta["hash"] == run["hash"] and len(run["sessions"]) == 2
    assert sorted(s["shard"] for s in run["sessions"]) == ["0/2", "1/2"]
    assert meta["n_rows"] == _gen(run_dir).height
    assert meta["completions"]["prompts_shown"] == meta["completions"]["prompts_total"] == 6
    assert "sweep.samples=2" in meta["overrides"]
    assert meta["description"] == HOSTILE  # escaped in the page, read back intact
    assert {c["family"] for c in meta["cells"]} == {"baseline", "constant", "SAE-gated"}
    assert len(html.encode()) < 5_000_000


def test_no_script_or_link_from_elsewhere(run_dir):
    html = (run_dir / REPORT_NAME).read_text()
    assert not re.search(r"<script[^>]+src=", html) and not re.search(r"<link[^>]+href=", html)


def test_report_only_rebuilds_from_the_folder(run_dir, capsys):
    from recipes import regex

    path = run_dir / REPORT_NAME
    before = _meta(path.read_text())
    path.unlink()
    assert regex.main(["--report-only", str(run_dir)]) == 0
    after = _meta(path.read_text())
    for k in ("hash", "n_rows", "summary", "cells", "recipe_toml", "sessions", "completions"):
        assert after[k] == before[k], k


def test_report_only_of_a_shared_run_writes_nothing_through_its_links(run_dir, tmp_path):
    """A run folder from someone else ships links where the report writes (its final names and the
    temporary names it used to use), one of them dangling into a place that runs code at start-up:
    ``--report-only`` refuses the folder, and the report's writer replaces such a link, never writing
    through it."""
    from recipes import regex

    shared = tmp_path / "shared-run"
    shutil.copytree(run_dir, shared)
    home = tmp_path / "home"
    home.mkdir()
    bashrc = home / ".bashrc"
    bashrc.write_text("# mine\n")
    planted = {"summary.csv": bashrc, "summary.parquet": bashrc, REPORT_NAME: bashrc, f".{REPORT_NAME}.tmp": bashrc,
               "run.json.tmp": bashrc, "pareto.html": home / "site-packages" / "zz.pth"}
    (home / "site-packages").mkdir()
    for name, target in planted.items():
        (shared / name).unlink(missing_ok=True)
        (shared / name).symlink_to(target)
    assert regex.main(["--report-only", str(shared), "--no-progress"]) == 2  # a folder with links is not read
    assert bashrc.read_text() == "# mine\n" and not list((home / "site-packages").iterdir())
    # and where a link appears after that check, no writer follows it (sieve.files.write_atomic)
    from sieve.report import run_recipe, write_report
    from sieve.results import ResultStore

    write_report(shared, run_recipe(run_dir), pl.read_parquet(run_dir / "summary.parquet"))
    assert bashrc.read_text() == "# mine\n" and not (shared / REPORT_NAME).is_symlink()
    assert ResultStore(shared / "gen").table().height == ResultStore(run_dir / "gen").table().height


def test_a_shared_run_folder_that_links_elsewhere_is_not_read(run_dir, tmp_path, capsys):
    """A shared run folder whose parts or prompts link to another run (the user's own, private) would
    bring that run's texts into the report: --report-only and --merge refuse it before reading."""
    from recipes import regex

    private = tmp_path / "private-run"
    shutil.copytree(run_dir, private)
    shared = tmp_path / "shared-run"
    shutil.copytree(run_dir, shared)
    part = sorted((shared / "gen").glob("part-*.parquet"))[0]
    part.unlink()
    part.symlink_to(private / "gen" / part.name)
    report = (shared / REPORT_NAME).read_text()
    assert regex.main(["--report-only", str(shared), "--no-progress"]) == 2
    assert "holds a symbolic link" in capsys.readouterr().err
    assert (shared / REPORT_NAME).read_text() == report  # nothing rebuilt from the linked rows
    merged = tmp_path / "merged"
    assert regex.main([str(RECIPE), *_overrides(merged), "--merge", str(shared), "--out", str(merged),
                       "--no-progress"]) == 2
    assert "--merge" in capsys.readouterr().err and not (merged / "gen").exists()


def test_a_shards_run_json_does_not_decide_how_a_merged_folder_is_reported(run_dir, tmp_path, capsys):
    """A shard's recipe.json is checked at --merge; its run.json, which carries the recipe the report
    reads later, was not: an edited one relabelled the user's merged folder (another model, the loss
    called MMLU accuracy, the Pareto front flipped)."""
    from recipes import regex

    shard = tmp_path / "shard"
    shutil.copytree(run_dir, shard)
    run = json.loads((shard / "run.json").read_text())
    run["recipe"]["name"], run["recipe"]["eval"]["general"] = "someone else's study", "mmlu"
    (shard / "run.json").write_text(json.dumps(run))
    merged = tmp_path / "merged"
    assert regex.main([str(RECIPE), *_overrides(merged), "--merge", str(shard), "--out", str(merged),
                       "--no-progress"]) == 0
    assert load_run(merged)["recipe"]["name"] != "someone else's study"
    assert load_run(merged)["hash"] == json.loads((merged / "recipe.json").read_text())["hash"]
    # and a folder whose run.json names another recipe than its recipe.json is not reported as either
    (merged / "run.json").write_text(json.dumps({**load_run(merged), "recipe": run["recipe"]}))
    assert regex.main(["--report-only", str(merged), "--no-progress"]) == 2
    assert "holds results of another recipe" in capsys.readouterr().err


def test_report_only_on_a_folder_without_results(tmp_path, capsys):
    from recipes import regex

    assert regex.main(["--report-only", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert "not a run folder" in err and "Traceback" not in err


def test_budget_keeps_whole_prompts(run_dir, tmp_path):
    from sieve.recipe import load_recipe
    from sieve.report import write_report

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    summary = pl.read_parquet(copy / "summary.parquet")
    recipe = load_recipe(RECIPE, _overrides(copy))
    full = (run_dir / REPORT_NAME).read_text()
    budget = len(full.encode()) - len(_packed(full)) // 2  # room for about half the completions
    path = write_report(copy, recipe, summary, budget_bytes=budget)
    html = path.read_text()
    meta = _meta(html)
    c = meta["completions"]
    assert 1 <= c["prompts_shown"] < c["prompts_total"] == 6
    assert len(html.encode()) <= budget
    # Every shown prompt keeps all its samples and every method: the side by side stays complete.
    data = json.loads(gzip.decompress(base64.b64decode(_packed(html))))
    assert len(data["prompts"]) == c["prompts_shown"]
    assert len(data["groups"]) == 2 * c["prompts_shown"]
    assert all(sorted(r[0] for r in g) == list(range(len(meta["cells"]))) for g in data["groups"].values())


# --- in a real browser --------------------------------------------------------------------------------


def _browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("no chromium/chromedriver on PATH (Debian: apt-get install chromium chromium-driver; "
                    "scripts/setup.sh does it where it runs as root with apt)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed (the dev extra has it)")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1800"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    d = webdriver.Chrome(service=Service(driver), options=opts)
    # The network is off: anything the page tried to fetch from elsewhere would fail and show.
    d.execute_cdp_cmd("Network.enable", {})
    d.execute_cdp_cmd("Network.emulateNetworkConditions",
                      {"offline": True, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1})
    return d


@pytest.fixture(scope="module")
def page(run_dir):
    from selenium.webdriver.support.ui import WebDriverWait

    d = _browser()
    try:
        d.get((run_dir / REPORT_NAME).as_uri())
        WebDriverWait(d, 30).until(lambda d: d.execute_script("return document.body.dataset.ready === '1'"))
        WebDriverWait(d, 30).until(lambda d: d.execute_script(
            "return document.querySelectorAll('#chart-pareto svg .mark-symbol path, #chart-pareto svg path').length > 0"))
        yield d
    finally:
        d.quit()


def test_page_renders_offline_without_errors(page, run_dir):
    from selenium.webdriver.common.by import By

    logs = page.get_log("browser")
    assert not [e for e in logs if e["level"] == "SEVERE"], logs  # console errors, failed loads
    urls = {json.loads(e["message"])["message"]["params"]["request"]["url"] for e in page.get_log("performance")
            if json.loads(e["message"])["message"]["method"] == "Network.requestWillBeSent"}
    assert urls == {(run_dir / REPORT_NAME).as_uri()}
    assert page.title.startswith("sieve report") and page.find_element(By.ID, "description").text == HOSTILE
    # The charts drew: an SVG with plotted marks.
    assert page.find_elements(By.CSS_SELECTOR, "#chart-pareto svg")
    summary = pl.read_parquet(run_dir / "summary.parquet")
    assert len(page.find_elements(By.CSS_SELECTOR, "#summary tbody tr")) == summary.height
    assert len(page.find_elements(By.CSS_SELECTOR, "#summary tr.front-all")) == int(summary["pareto_all"].sum())


def test_summary_sorts(page):
    from selenium.webdriver.common.by import By

    page.find_element(By.CSS_SELECTOR, '#summary th[data-key="regex_rate"]').click()
    cells = [float(td.text.split()[0]) for td in page.find_elements(By.CSS_SELECTOR, "#summary td.regex_rate")]
    assert cells == sorted(cells)
    page.find_element(By.CSS_SELECTOR, '#summary th[data-key="regex_rate"]').click()
    cells = [float(td.text.split()[0]) for td in page.find_elements(By.CSS_SELECTOR, "#summary td.regex_rate")]
    assert cells == sorted(cells, reverse=True)


def test_choosing_another_prompt_changes_the_side_by_side(page, run_dir):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    gen = _gen(run_dir)
    cards = lambda: page.find_elements(By.CSS_SELECTOR, "#cards .card")  # noqa: E731
    Select(page.find_element(By.ID, "sel-set")).select_by_value("regex")
    Select(page.find_element(By.ID, "sel-prompt")).select_by_value("0")
    Select(page.find_element(By.ID, "sel-sample")).select_by_value("0")
    first = [c.find_element(By.TAG_NAME, "pre").text for c in cards()]
    n_cells = gen.select("method", "scale").unique().height
    assert len(first) == n_cells
    # The unsteered card shows that row's completion (the browser drops a trailing newline).
    row = gen.filter((pl.col("set") == "regex") & (pl.col("prompt_index") == 0) & (pl.col("sample") == 0)
                     & (pl.col("method") == "unsteered"))
    assert first[0] == row["text"][0].strip("\n") or first[0] == row["text"][0].rstrip()
    prompt_before = page.find_element(By.ID, "prompt").text
    Select(page.find_element(By.ID, "sel-prompt")).select_by_value("1")
    second = [c.find_element(By.TAG_NAME, "pre").text for c in cards()]
    assert len(second) == n_cells and second != first
    assert page.find_element(By.ID, "prompt").text != prompt_before
    assert "prompt=1" in page.current_url


def test_fired_and_edited_tokens_are_marked(page, run_dir):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    gen = _gen(run_dir)
    row = gen.filter((pl.col("set") == "regex") & (pl.col("method") == "constant_sae")).row(0, named=True)
    Select(page.find_element(By.ID, "sel-set")).select_by_value("regex")
    Select(page.find_element(By.ID, "sel-prompt")).select_by_value(str(row["prompt_index"]))
    Select(page.find_element(By.ID, "sel-sample")).select_by_value(str(row["sample"]))
    card = page.find_element(By.CSS_SELECTOR, f'#cards .card[data-method="constant_sae"][data-scale="{row["scale"]:g}"]')
    assert len(card.find_elements(By.CSS_SELECTOR, "span.t.e")) == len(row["gen_edited_at"])
    fired = gen.filter((pl.col("method") == "conditional_per_token") & (pl.col("prompt_fired") > 0)).row(0, named=True)
    Select(page.find_element(By.ID, "sel-set")).select_by_value(fired["set"])
    Select(page.find_element(By.ID, "sel-prompt")).select_by_value(str(fired["prompt_index"]))
    Select(page.find_element(By.ID, "sel-sample")).select_by_value(str(fired["sample"]))
    sel = f'#cards .card[data-method="conditional_per_token"][data-scale="{fired["scale"]:g}"]'
    page.find_element(By.CSS_SELECTOR, sel).click()
    assert len(page.find_elements(By.CSS_SELECTOR, "#prompt span.t.pf")) == fired["prompt_fired"]


def test_screenshot(page, tmp_path):
    png = tmp_path / "report.png"
    assert page.save_screenshot(str(png)) and png.stat().st_size > 10_000


def test_detector_and_mmlu_tables_join_the_report(run_dir, tmp_path):
    """recipes.detect and recipes.mmlu write into the run folder; --report-only then shows their tables
    and the precision-recall chart."""
    from recipes import regex

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    metrics = pl.DataFrame({"detector": ["sae", "sae"], "level": ["token", "text"], "threshold": [3.0, 3.0],
                            "precision": [0.5, 0.75], "recall": [0.25, 0.6], "f1": [0.333, 0.667],
                            "auroc": [0.8, 0.9], "positives": [40, 10], "n": [400, 20]})
    metrics.write_parquet(copy / "detect.parquet")
    pl.DataFrame({"detector": ["sae"] * 3, "recall": [0.0, 0.25, 1.0], "precision": [1.0, 0.5, 0.1],
                  "threshold": [9.0, 3.0, -9.0]}).write_parquet(copy / "detect_curves.parquet")
    pl.DataFrame({"method": ["unsteered"], "scale": [0.0], "accuracy": [0.3], "lo": [0.2], "hi": [0.4],
                  "n": [50]}).write_parquet(copy / "mmlu.parquet")
    assert regex.main(["--report-only", str(copy)]) == 0
    meta = _meta((copy / REPORT_NAME).read_text())
    assert [r["precision"] for r in meta["detect"]] == [0.5, 0.75] and meta["mmlu"][0]["accuracy"] == 0.3
    assert "detect_pr" in meta["charts"]
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        return
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    d = _browser()
    try:
        d.get((copy / REPORT_NAME).as_uri())
        WebDriverWait(d, 30).until(lambda d: d.execute_script("return document.body.dataset.ready === '1'"))
        WebDriverWait(d, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#chart-detect svg"))
        assert d.find_element(By.ID, "detect-section").is_displayed()
        assert len(d.find_elements(By.CSS_SELECTOR, "#detect tbody tr")) == 2
        assert d.find_element(By.CSS_SELECTOR, "#mmlu tbody td.txt").text == "unsteered"
        assert not [e for e in d.get_log("browser") if e["level"] == "SEVERE"]
    finally:
        d.quit()
