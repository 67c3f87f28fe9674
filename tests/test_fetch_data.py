"""Fetching datasets: copies and downloads are verified before they land, re-runs skip, bad files never land."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest

from fairforget.artifacts import FOLDER_MARKER
from fairforget.datasets import DATASETS, FileSpec, data_path, dataset_files, fetch, manifest, verify_dataset
from fairforget.errors import FairforgetError

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "00_fetch_data.py"
FIXTURE = {  # small files standing in for a dataset, keyed by their path under data/
    "toy/data/a.jsonl": b'{"x": 1}\n{"x": 2}\n',
    "toy/data/b.csv": b"id,text\n1,hello\n2,world\n" * 50,
    "toy/LICENSE": b"MIT\n",
}


def spec_of(file: str, content: bytes) -> FileSpec:
    return FileSpec(file, len(content), hashlib.sha256(content).hexdigest(),
                    f"github:owner/repo@c0ffee:upstream/{file.split('/', 1)[1]}")


SPECS = [spec_of(f, c) for f, c in FIXTURE.items()]


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(content)
    return root


def all_files(root: Path) -> set[str]:
    """Every file under root (hidden temporaries included), as paths relative to root."""
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} if root.exists() else set()


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True)


# --- the pinned manifest -------------------------------------------------------------------------------------

def test_manifest_lists_exactly_the_shared_files(shared_data):
    shared = json.loads((shared_data / "MANIFEST.json").read_text())
    expected = {e["file"]: (e["bytes"], e["sha256"], e["upstream"]) for e in shared}
    ours = {s.file: (s.bytes, s.sha256, s.upstream) for s in manifest()}
    assert len(ours) == len(manifest())  # no duplicates
    assert ours == expected


def test_manifest_has_the_benchmark_files():
    files = {s.file for s in manifest()}
    bbq = ["Age", "Disability_status", "Gender_identity", "Nationality", "Physical_appearance", "Race_ethnicity",
           "Race_x_SES", "Race_x_gender", "Religion", "SES", "Sexual_orientation"]
    winobias = [f"{kind}_stereotyped_type{t}.txt.{split}" for kind in ("pro", "anti") for t in (1, 2)
                for split in ("dev", "test")]
    required = (["stereoset/dev.json", "bbq/supplemental/additional_metadata.csv", "bbq/LICENSE",
                 "crows_pairs/data/crows_pairs_anonymized.csv", "winogender/LICENSE", "winobias/LICENSE"]
                + [f"bbq/data/{c}.jsonl" for c in bbq] + [f"winobias/data/{f}" for f in winobias]
                + [f"winogender/data/{f}" for f in ("all_sentences.tsv", "templates.tsv", "occupations-stats.tsv")])
    assert set(required) <= files
    assert {s.dataset for s in manifest()} == set(DATASETS)


def test_raw_url_is_the_pinned_commit():
    spec = next(s for s in manifest() if s.file == "winogender/data/templates.tsv")
    assert spec.url() == ("https://raw.githubusercontent.com/rudinger/winogender-schemas/"
                          "1c7f8b481ad8a234b41e9f76a424d6e856e13f7f/data/templates.tsv")


# --- copying from a local folder -----------------------------------------------------------------------------

def test_copy_verifies_and_second_run_skips(tmp_path):
    source, out = write_tree(tmp_path / "src", FIXTURE), tmp_path / "data"
    first = fetch(SPECS, out, source=source, log=lambda _: None)
    assert [r.status for r in first] == ["copied"] * 3
    assert all_files(out) == set(FIXTURE)
    assert all((out / f).read_bytes() == c for f, c in FIXTURE.items())
    stamps = {f: (out / f).stat().st_mtime_ns for f in FIXTURE}
    lines: list[str] = []
    second = fetch(SPECS, out, source=source, log=lines.append)
    assert [r.status for r in second] == ["present"] * 3
    assert all("skip" in line for line in lines) and len(lines) == 3
    assert {f: (out / f).stat().st_mtime_ns for f in FIXTURE} == stamps  # not rewritten


def corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-7])


@pytest.mark.parametrize("damage, message", [
    (corrupt, "sha256 mismatch: expected {sha256}, found"),
    (truncate, "expected {bytes:,} bytes, found {short:,}"),
    (Path.unlink, "source file missing: {source}"),
])
def test_bad_source_file_fails_and_leaves_nothing(tmp_path, damage, message):
    source, out = write_tree(tmp_path / "src", FIXTURE), tmp_path / "data"
    bad = SPECS[1]
    damage(source / bad.file)
    results = fetch(SPECS, out, source=source, log=lambda _: None)
    assert [r.status for r in results] == ["copied", "failed", "copied"]
    expected = message.format(sha256=bad.sha256, bytes=bad.bytes, short=bad.bytes - 7, source=source / bad.file)
    assert expected in results[1].error
    assert all_files(out) == {SPECS[0].file, SPECS[2].file}  # no partial or temporary file left


def test_bad_source_never_replaces_a_good_file(tmp_path):
    source, out = write_tree(tmp_path / "src", FIXTURE), tmp_path / "data"
    fetch(SPECS, out, source=source, log=lambda _: None)
    corrupt(source / SPECS[1].file)
    results = fetch(SPECS, out, source=source, force=True, log=lambda _: None)
    assert [r.status for r in results] == ["copied", "failed", "copied"]
    assert (out / SPECS[1].file).read_bytes() == FIXTURE[SPECS[1].file]
    assert all_files(out) == set(FIXTURE)


def test_altered_destination_is_replaced_by_verified_copy(tmp_path):
    source, out = write_tree(tmp_path / "src", FIXTURE), tmp_path / "data"
    fetch(SPECS, out, source=source, log=lambda _: None)
    corrupt(out / SPECS[0].file)
    results = fetch(SPECS, out, source=source, log=lambda _: None)
    assert [r.status for r in results] == ["copied", "present", "present"]
    assert (out / SPECS[0].file).read_bytes() == FIXTURE[SPECS[0].file]


# --- downloading ---------------------------------------------------------------------------------------------

def mirror_of(root: Path, files: dict[str, bytes]) -> Path:
    """A raw-file server tree for the fixture specs: ROOT/owner/repo/c0ffee/upstream/..."""
    return write_tree(root, {f"owner/repo/c0ffee/upstream/{f.split('/', 1)[1]}": c for f, c in files.items()})


def test_download_from_file_url_verifies(tmp_path):
    mirror, out = mirror_of(tmp_path / "mirror", FIXTURE), tmp_path / "data"
    base_url = (tmp_path / "mirror").as_uri()
    results = fetch(SPECS, out, base_url=base_url, log=lambda _: None)
    assert [r.status for r in results] == ["downloaded"] * 3
    assert results[0].source == f"{base_url}/owner/repo/c0ffee/upstream/data/a.jsonl"
    assert all((out / f).read_bytes() == c for f, c in FIXTURE.items())
    corrupt(mirror / "owner/repo/c0ffee/upstream/data/b.csv")
    (mirror / "owner/repo/c0ffee/upstream/LICENSE").unlink()
    results = fetch(SPECS, out, base_url=base_url, force=True, log=lambda _: None)
    assert [r.status for r in results] == ["downloaded", "failed", "failed"]
    assert "sha256 mismatch" in results[1].error and "source file missing" in results[2].error
    assert all((out / f).read_bytes() == c for f, c in FIXTURE.items())  # the good copies stay
    assert all_files(out) == set(FIXTURE)


def test_injected_opener_gets_raw_urls_and_short_bodies_fail(tmp_path):
    asked: list[tuple[str, float]] = []

    def opener(url, timeout):
        asked.append((url, timeout))
        content = FIXTURE[SPECS[len(asked) - 1].file]
        return io.BytesIO(content[:-1] if url.endswith("b.csv") else content)

    results = fetch(SPECS, tmp_path / "data", opener=opener, timeout=5.0, log=lambda _: None)
    assert asked == [("https://raw.githubusercontent.com/owner/repo/c0ffee/upstream/data/a.jsonl", 5.0),
                     ("https://raw.githubusercontent.com/owner/repo/c0ffee/upstream/data/b.csv", 5.0),
                     ("https://raw.githubusercontent.com/owner/repo/c0ffee/upstream/LICENSE", 5.0)]
    assert [r.status for r in results] == ["downloaded", "failed", "downloaded"]
    assert f"expected {SPECS[1].bytes:,} bytes, found {SPECS[1].bytes - 1:,}" in results[1].error
    assert all_files(tmp_path / "data") == {SPECS[0].file, SPECS[2].file}


def test_unreachable_url_stops_with_one_error(tmp_path):
    def opener(url, timeout):
        raise urllib.error.URLError(OSError("Name or service not known"))

    with pytest.raises(FairforgetError, match=r"cannot download toy/data/a\.jsonl from https://raw") as err:
        fetch(SPECS, tmp_path / "data", opener=opener, log=lambda _: None)
    assert "Name or service not known" in str(err.value)
    assert all_files(tmp_path / "data") == set()


# --- the script, end to end ----------------------------------------------------------------------------------

def test_script_copies_winogender_then_skips(shared_data, tmp_path):
    out = tmp_path / "data"
    first = run_script("--source", str(shared_data), "--datasets", "winogender", "--out", str(out))
    assert first.returncode == 0, first.stderr
    shared = {e["file"]: e for e in json.loads((shared_data / "MANIFEST.json").read_text())
              if e["file"].startswith("winogender/")}
    assert all_files(out) == set(shared) | {"MANIFEST.json", FOLDER_MARKER}  # the marker: a fairforget data root
    for name, entry in shared.items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == entry["sha256"]
    written = json.loads((out / "MANIFEST.json").read_text())
    assert {e["file"]: e["sha256"] for e in written["files"]} == {f: e["sha256"] for f, e in shared.items()}
    assert {e["status"] for e in written["files"]} == {"copied"}
    assert written["files"][0]["source"] == str(shared_data.resolve() / written["files"][0]["file"])

    second = run_script("--source", str(shared_data), "--datasets", "winogender", "--out", str(out))
    assert second.returncode == 0, second.stderr
    assert "5 skipped (present)" in second.stdout and "copied " not in second.stdout
    rewritten = json.loads((out / "MANIFEST.json").read_text())
    assert {e["status"] for e in rewritten["files"]} == {"present"}
    assert rewritten["files"][0]["source"] == written["files"][0]["source"]  # where it came from is kept

    assert [e["sha256"] for e in verify_dataset(out, "winogender")] == [s.sha256 for s in dataset_files("winogender")]


def test_script_exits_2_naming_the_corrupted_file(shared_data, tmp_path):
    source, out = tmp_path / "src", tmp_path / "data"
    shutil.copytree(shared_data / "winogender", source / "winogender")
    corrupt(source / "winogender/data/templates.tsv")
    result = run_script("--source", str(source), "--datasets", "winogender", "--out", str(out))
    assert result.returncode == 2
    assert "winogender/data/templates.tsv: sha256 mismatch" in result.stderr
    assert "FAILED" in result.stdout
    assert "winogender/data/templates.tsv" not in all_files(out) and "MANIFEST.json" not in all_files(out)
    assert not any(name.endswith(".tmp") for name in all_files(out))


def test_script_rejects_bad_flags(tmp_path):
    result = run_script("--source", str(tmp_path / "nowhere"))
    assert result.returncode == 2 and "nowhere is not a folder" in result.stderr
    assert run_script("--datasets", "imdb").returncode == 2


# --- helpers for other stages --------------------------------------------------------------------------------

def test_verify_dataset_and_data_path(shared_data, tmp_path):
    checked = verify_dataset(shared_data, "crows_pairs")
    shared = {e["file"]: e["sha256"] for e in json.loads((shared_data / "MANIFEST.json").read_text())}
    assert {e["file"]: e["sha256"] for e in checked} == {f: h for f, h in shared.items() if f.startswith("crows_")}

    root = tmp_path / "data"
    shutil.copytree(shared_data / "winogender", root / "winogender")
    assert data_path("winogender", "data/templates.tsv", root) == root / "winogender/data/templates.tsv"
    corrupt(root / "winogender/data/templates.tsv")
    with pytest.raises(FairforgetError, match=r"templates\.tsv does not match the pinned manifest: sha256 mismatch"):
        verify_dataset(root, "winogender")
    (root / "winogender/LICENSE").unlink()
    (root / "winogender/data/templates.tsv").write_bytes((shared_data / "winogender/data/templates.tsv").read_bytes())
    with pytest.raises(FairforgetError, match=r"missing: .*winogender/LICENSE; run .*--datasets winogender"):
        verify_dataset(root, "winogender")
    with pytest.raises(FairforgetError, match="not a file of the pinned bbq dataset"):
        data_path("bbq", "data/Nope.jsonl")
    with pytest.raises(FairforgetError, match="unknown dataset"):
        verify_dataset(root, "imdb")


# --- verification when a stage uses the data ------------------------------------------------------------------

def test_stage_inputs_are_hashed_once_per_process(shared_data, tmp_path, monkeypatch):
    from fairforget import datasets

    out = tmp_path / "data"
    assert run_script("--source", str(shared_data), "--datasets", "winogender", "--out", str(out)).returncode == 0
    hashed: list[Path] = []
    monkeypatch.setattr(datasets, "sha256_file", lambda path: hashed.append(Path(path)) or sha256(Path(path)))
    monkeypatch.setattr(datasets, "_verified", set())
    flags = {"--winogender-dir": out / "winogender" / "data"}
    assert sorted(f.name for f, _ in datasets.pinned_files(flags["--winogender-dir"])) == [
        "all_sentences.tsv", "occupations-stats.tsv", "templates.tsv"]
    datasets.check_data_inputs(flags)
    datasets.check_data_inputs(flags)
    assert sorted(f.name for f in hashed) == ["all_sentences.tsv", "occupations-stats.tsv", "templates.tsv"]
    hashed.clear()  # each hashed once in this process: a size and mtime recorded on disk are not trusted

    templates = out / "winogender/data/templates.tsv"
    good = templates.read_bytes()
    corrupt(templates)  # same size, other bytes
    with pytest.raises(FairforgetError, match=r"data file .*templates\.tsv does not match the pinned manifest "
                                              r"\(sha256 mismatch.*--datasets winogender --force.*with "
                                              r"--winogender-dir"):
        datasets.check_data_inputs(flags)
    assert hashed == [templates]
    templates.write_bytes(good)  # restored: a new mtime, so hashed once, then remembered
    datasets.check_data_inputs(flags)
    datasets.check_data_inputs(flags)
    assert hashed == [templates, templates]

    custom = tmp_path / "mine" / "winogender" / "data"  # the same layout outside a data root: a custom input
    shutil.copytree(out / "winogender" / "data", custom)
    corrupt(custom / "templates.tsv")
    assert datasets.pinned_files(custom) == []
    datasets.check_data_inputs({"--winogender-dir": custom})


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_pipeline_data_step_reverifies_instead_of_trusting_its_record(tmp_path, monkeypatch):
    from fairforget import datasets
    from fairforget.hashing import Hasher
    from fairforget.study.pipeline import Stage, why_not_done, write_record

    monkeypatch.setattr(datasets, "manifest", lambda: tuple(SPECS))
    root = write_tree(tmp_path / "data", FIXTURE)
    (root / "MANIFEST.json").write_text("{}")
    stage = Stage("00 fetch data", "00_fetch_data.py", {"out": root, "source": None}, outputs=[root / "MANIFEST.json"])
    write_record(stage, Hasher(), 1.0)
    assert why_not_done(stage, Hasher()) is None
    corrupt(root / "toy/data/b.csv")
    assert why_not_done(stage, Hasher()) == (f"data file {root / 'toy/data/b.csv'} does not match the pinned "
                                             f"manifest (sha256 mismatch: expected {SPECS[1].sha256}, found "
                                             f"{sha256(root / 'toy/data/b.csv')} (corrupted or wrong version))")
    (root / "toy/data/b.csv").write_bytes(FIXTURE["toy/data/b.csv"])
    (root / "toy/LICENSE").unlink()
    assert why_not_done(stage, Hasher()) == f"data file {root / 'toy/LICENSE'} is missing"
