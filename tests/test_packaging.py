"""Packaging: the Trovi crate imports the way Trovi reads it, pins agree, notebooks ship clean.

The crate check follows Trovi's importer (ChameleonCloud/trovi, trovi/importing/views.py): it loads
`trovi.json` with the `rocrate` package, dereferences "./" and reads name,
disambiguatingDescription, description, keywords (one comma-separated string), author (Person
references) and actionApplication (SoftwareApplication nodes with trovi_type/trovi_arguments).
"""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from nanorepro import envlock

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))

# Trovi's limits (trovi/settings.py: ARTIFACT_*_MAX_CHARS).
MAX_TITLE, MAX_SHORT, MAX_LONG, MAX_TAG, MAX_AUTHOR_FIELD = 140, 200, 5000, 32, 200

# Trovi rejects a tag it does not already know: its importer looks each one up in its tag table
# (ChameleonCloud/trovi, trovi/api/serializers.py: `raise NotFound(f"Unknown tag {tag}")`; the table is data,
# listed by GET /meta/tags, which this machine cannot reach). Chameleon's docs name "education", "experiment",
# "reproducible research" and "appliance" as tags to browse by (technical/experiments/browsing_artifacts.rst).
# These are the ones also seen in
# trovi.json files of published Trovi artifacts: "reproducible research" and "experiment"
# (grycap/im-trovi-artifact, KabilanMA/Splyce, RedPanda-88/NetPress-Reproduction,
# grycap/grycap-imcham-trovi), "example" and "experiment pattern"
# (ChameleonCloud/power_measurement_experiment), "example" and "education"
# (ChameleonCloud/edge_sensehat_image), "appliance" (pmodels/cc-hpc-appliances).
KNOWN_TROVI_TAGS = {"reproducible research", "experiment", "example", "experiment pattern",
                    "education", "appliance"}

# trovi/models.py ArtifactVersionSetup.ArtifactVersionSetupType
TROVI_SETUP_TYPES = {"jupyterhub", "isolated_jupyter", "source_code", "image", "heat_template"}

EXTRAS_FOR_A_FULL_RUN = ("train", "notebooks", "chameleon")


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def crate_root(tmp_path_factory, monkeypatch_module):
    """The root dataset, loaded from trovi.json the way Trovi's importer loads it."""
    import rocrate.metadata
    import rocrate.rocrate
    from rocrate.rocrate import ROCrate

    # Trovi renames the metadata file (Metadata.BASENAME = settings.RO_CRATE_FILENAME); rocrate
    # 0.16 reads the name from these two module globals.
    monkeypatch_module.setattr(rocrate.metadata, "BASENAME", "trovi.json")
    monkeypatch_module.setattr(rocrate.rocrate, "BASENAME", "trovi.json")
    d = tmp_path_factory.mktemp("crate")
    shutil.copy(REPO / "trovi.json", d / "trovi.json")
    return ROCrate(d).dereference("./")


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_trovi_json_is_ro_crate_1_1():
    doc = json.loads((REPO / "trovi.json").read_text(encoding="utf-8"))
    assert doc["@context"] == "https://w3id.org/ro/crate/1.1/context"
    graph = {e["@id"]: e for e in doc["@graph"]}
    descriptor = graph["trovi.json"]
    assert descriptor["@type"] == "CreativeWork"
    assert descriptor["about"] == {"@id": "./"}
    assert descriptor["conformsTo"] == {"@id": "https://w3id.org/ro/crate/1.1"}
    assert graph["./"]["@type"] == "Dataset"


def test_trovi_text_fields_fit(crate_root):
    name = crate_root.get("name")
    short = crate_root.get("disambiguatingDescription")
    long = crate_root.get("description")
    assert name and len(name) <= MAX_TITLE, name
    assert short and len(short) <= MAX_SHORT, short
    assert long and len(long) <= MAX_LONG, len(long)
    # what the artifact reproduces and how to run it
    for needle in ("A100", "python-chi", "Tiny Shakespeare", "1.4697", "gpt2-xl", "in order"):
        assert needle in long, needle


def test_trovi_description_lists_the_shipped_notebooks(crate_root):
    named = re.findall(r"\b\d\d_\w+\.ipynb\b", crate_root.get("description"))
    shipped = [p.name for p in NOTEBOOKS]
    # "open the notebooks in order": the description lists every one, in the order they run
    assert named == shipped, f"trovi.json lists {named}; notebooks/ holds {shipped}"


def test_trovi_how_to_run_matches_the_notebooks_defaults(crate_root):
    """"Run All, nothing needs setting" holds only if every notebook defaults to target "auto" and results
    that follow it, and only 00 asks for the node's site, type, hours and project."""
    how = crate_root.get("description").split("**How to run:**")[1]
    assert 'target = "auto"' in how and "results/chameleon" in how
    for path in NOTEBOOKS:
        nb = json.loads(path.read_text(encoding="utf-8"))
        params = "".join(next(c["source"] for c in nb["cells"] if "parameters" in c["metadata"].get("tags", [])))
        assert 'target = "auto"' in params and "results_dir = None" in params, path.name
        names = {line.split("=")[0].strip() for line in params.splitlines() if "=" in line and line[0] != "#"}
        node_choices = {"site", "node_type", "nodes", "lease_hours", "project", "image"} & names
        assert node_choices == (node_choices if path.name.startswith("00_") else set()), path.name
        if path.name.startswith("00_"):
            assert node_choices == {"site", "node_type", "nodes", "lease_hours", "project", "image"}
            assert all(f"`{n}`" in how for n in node_choices)


def test_trovi_keywords_are_known_tags(crate_root):
    keywords = crate_root.get("keywords")
    assert isinstance(keywords, str), "Trovi splits one comma-separated string"
    tags = [t.strip() for t in keywords.split(",")]
    assert tags and all(tags), keywords
    unknown = [t for t in tags if t.lower() not in KNOWN_TROVI_TAGS]
    assert not unknown, f"Trovi rejects unknown tags: {unknown}"
    assert all(len(t) <= MAX_TAG for t in tags)


def test_trovi_authors_resolve_to_people(crate_root):
    authors = crate_root.get("author")
    assert isinstance(authors, list) and authors
    for a in authors:
        assert not isinstance(a, str), f"author reference {a!r} does not resolve to a node"
        assert a.type == "Person"
        for field in ("name", "email", "affiliation"):
            value = a.get(field)
            assert isinstance(value, str) and value.strip() and len(value) <= MAX_AUTHOR_FIELD, (field, value)
        email = a.get("email")
        assert re.fullmatch(r"[^@\s]+@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+", email), email
        assert not re.search(r"@example\.(org|com|net|edu)$", email), f"placeholder email {email}"


def test_trovi_launches_in_chameleon_jupyterlab(crate_root):
    apps = crate_root.get("actionApplication", [])
    setups = [(a.get("trovi_type"), a.get("trovi_arguments")) for a in apps
              if not isinstance(a, str) and a.type == "SoftwareApplication" and a.get("trovi_type")]
    assert setups, "no SoftwareApplication with trovi_type: Trovi would fall back to its default"
    for kind, arguments in setups:
        assert kind in TROVI_SETUP_TYPES, kind
        assert isinstance(json.loads(arguments), dict), arguments
    assert ("jupyterhub", "{}") in setups


def test_trovi_version_license_date_match_the_package(crate_root, pyproject):
    assert crate_root.get("version") == pyproject["project"]["version"]
    assert crate_root.get("license") == pyproject["project"]["license"]
    published = dt.datetime.fromisoformat(crate_root.get("datePublished"))
    assert published.tzinfo is not None


def _pins(requirements: list[str]) -> dict[str, str]:
    """name -> exact version for `name==version` requirements (others are ignored)."""
    pins = {}
    for line in requirements:
        if line.startswith("-"):
            continue
        req = Requirement(line)
        specs = list(req.specifier)
        if len(specs) == 1 and specs[0].operator == "==":
            pins[req.name.lower().replace("_", "-")] = specs[0].version
    return pins


def _environment_pip(env: dict) -> list[str]:
    pips = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pips) == 1, "environment.yml needs exactly one pip section"
    return pips[0]


def _uv() -> str:
    uv = envlock.find_uv(REPO)
    assert uv, f"uv {envlock.UV_VERSION} is neither on PATH nor in .uv/: run `make install`, which bootstraps it"
    return uv


def test_every_runtime_dependency_is_pinned(pyproject):
    project = pyproject["project"]
    every = list(project["dependencies"]) + [r for rs in project["optional-dependencies"].values() for r in rs]
    assert len(_pins(every)) == len(every), "every dependency in pyproject.toml is pinned with =="


def test_uv_lock_is_in_step_with_pyproject():
    r = subprocess.run([_uv(), "lock", "--check"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, "uv.lock is stale: run `make lock`\n" + r.stdout + r.stderr


def test_a_changed_pin_without_a_new_lock_fails_naming_make_lock(tmp_path):
    """What CI's `make test` does first (`make install`) in a clone whose pin moved while uv.lock did not: it stops
    before fetching anything, naming the pin and the command that refreshes the lock."""
    for name in ("pyproject.toml", "uv.lock", "README.md", "LICENSE"):
        shutil.copy(REPO / name, tmp_path)
    shutil.copytree(REPO / "nanorepro", tmp_path / "nanorepro", ignore=shutil.ignore_patterns("__pycache__"))
    text = (tmp_path / "pyproject.toml").read_text()
    assert '"tqdm==4.70.1"' in text
    (tmp_path / "pyproject.toml").write_text(text.replace('"tqdm==4.70.1"', '"tqdm==4.70.0"'))
    r = subprocess.run([sys.executable, "-m", "nanorepro.envlock", "install", "--venv", str(tmp_path / "venv")],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    assert ("nanorepro: uv.lock is out of step with pyproject.toml (tqdm: pyproject.toml ==4.70.0, uv.lock ==4.70.1) "
            "(fix: refresh it with `make lock`") in r.stderr
    assert not (tmp_path / "venv").exists() and not (tmp_path / ".uv").exists()  # nothing installed or fetched
    assert envlock.stale_pins(REPO) == []


def test_the_lock_records_nothing_of_this_machine():
    text = (REPO / "uv.lock").read_text(encoding="utf-8")
    assert "file://" not in text and "/opt/" not in text and "download.pytorch.org" not in text
    lock = envlock.read_lock(REPO / "uv.lock")
    sources = {tuple(p["source"]) for p in lock["package"]}
    assert sources == {("registry",), ("editable",)}, sources  # PyPI, and nanorepro itself
    assert {p["source"]["registry"] for p in lock["package"] if "registry" in p["source"]} == {"https://pypi.org/simple"}
    assert all(w.get("hash", "").startswith("sha256:") for p in lock["package"] for w in p.get("wheels", []))
    assert envlock.torch_version(lock) == "2.13.0"


def test_uv_bootstrap_requirement_pins_the_uv_pyproject_requires(pyproject):
    assert pyproject["tool"]["uv"]["required-version"] == f"=={envlock.UV_VERSION}"
    text = (REPO / envlock.UV_REQUIREMENTS).read_text()
    assert text.startswith(f"uv=={envlock.UV_VERSION} \\\n") and text.count("--hash=sha256:") >= 10


def test_environment_yml_is_generated_from_the_lock():
    text = (REPO / "environment.yml").read_text(encoding="utf-8")
    assert text == envlock.environment_yml(_uv(), REPO), "environment.yml is stale: run `make lock`"
    env = yaml.safe_load(text)
    assert "python=3.11" in env["dependencies"]
    pip = _environment_pip(env)
    editable = [p for p in pip if p.startswith("-e ")]
    assert len(editable) == 1, pip
    extras = set(Requirement("nanorepro" + editable[0][len("-e ."):]).extras)
    assert extras == set(EXTRAS_FOR_A_FULL_RUN), extras
    locked = envlock.locked_versions(envlock.read_lock(REPO / "uv.lock"))
    pins = [Requirement(p) for p in pip if not p.startswith("-")]
    assert all(len(r.specifier) == 1 and next(iter(r.specifier)).version in locked[r.name] for r in pins)
    assert {"torch", "numpy", "transformers", "python-chi", "jupyterlab", "filelock"} <= {r.name for r in pins}
    assert "pytest" not in {r.name for r in pins}  # the test extra is not part of it


def test_no_root_requirements_txt():
    # Chameleon's hub would pip install it into the 1 GB kernel image, torch included.
    assert not (REPO / "requirements.txt").exists()


def test_notebooks_exist():
    assert (REPO / "notebooks" / "01_prepare_data.ipynb") in NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_is_clean_and_parameterised(path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    assert nb.get("nbformat") == 4
    kernelspec = nb.get("metadata", {}).get("kernelspec", {})
    assert kernelspec.get("name") == "python3" and kernelspec.get("display_name"), kernelspec
    dirty = [i for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code"
             and (c.get("outputs") or c.get("execution_count") is not None)]
    assert not dirty, f"{path.name}: cells {dirty} carry outputs or execution counts"
    tagged = [i for i, c in enumerate(nb["cells"]) if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: cells tagged 'parameters': {tagged}"
    assert nb["cells"][tagged[0]]["cell_type"] == "code"
    # papermill reads every parameter (a `>=` in a comment, say, makes it skip the line with a warning)
    import nbformat
    from papermill.translators import PythonTranslator

    cell = nbformat.v4.new_code_cell("".join(nb["cells"][tagged[0]]["source"]))
    assigned = re.findall(r"^(\w+)\s*=", cell.source, re.M)
    assert [p.name for p in PythonTranslator.inspect(cell)] == assigned and assigned, path.name


# --------------------------------------------------------------------------- a fresh clone needs nothing else

MAX_FILE_BYTES = 1 << 20  # the project's limit for any committed file
SKIP_DIRS = {".git", ".venv", ".uv", "results", "build", "dist", "data", "runs", "cache", "__pycache__", ".pytest_cache",
             ".ipynb_checkpoints"}


def _repo_files() -> list[Path]:
    """The files a clone has: git's list in a checkout, else every file outside build and result folders."""
    r = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True)
    if r.returncode == 0 and r.stdout:
        return [REPO / f for f in r.stdout.split("\0") if f and (REPO / f).is_file()]
    return [p for p in REPO.rglob("*") if p.is_file() and not SKIP_DIRS & set(p.relative_to(REPO).parts)
            and not any(part.endswith(".egg-info") for part in p.parts)]


def test_every_file_is_under_1_mib():
    files = _repo_files()
    assert REPO / "nanorepro" / "bundled" / "tinyshakespeare.txt.gz" in files
    big = {str(p.relative_to(REPO)): p.stat().st_size for p in files if p.stat().st_size >= MAX_FILE_BYTES}
    assert not big, big


def test_nothing_reads_a_folder_beside_the_repo():
    sibling = "../" + "shared"  # spelled apart so this file does not find itself
    places = [REPO / "Makefile", *(REPO / ".ci").rglob("*"), *(REPO / "nanorepro").rglob("*.py"),
              *(REPO / "tests").rglob("*.py"), *(REPO / "notebooks").glob("*.ipynb")]
    found = [str(p.relative_to(REPO)) for p in places if p.is_file() and sibling in p.read_text(encoding="utf-8")]
    assert not found, found


def test_licence_is_an_spdx_expression_with_its_files(pyproject):
    project = pyproject["project"]
    assert project["license"] == "MIT"
    assert (REPO / "LICENSE").read_text(encoding="utf-8").startswith("MIT License\n")
    for pattern in project["license-files"]:
        assert list(REPO.glob(pattern)), f"license-files pattern {pattern!r} matches nothing"
    # the SPDX form and license-files need setuptools 77 or later to build
    (setuptools,) = [Requirement(r) for r in pyproject["build-system"]["requires"] if r.startswith("setuptools")]
    assert not setuptools.specifier.contains("76.9") and setuptools.specifier.contains("77.0")


@pytest.mark.slow  # by measurement: builds a wheel: ~2 s
def test_wheel_builds_without_warnings_and_ships_the_bundled_data(tmp_path):
    # a copy, so the build's scratch folders never land in the checkout
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, src)
    shutil.copytree(REPO / "nanorepro", src / "nanorepro", ignore=shutil.ignore_patterns("__pycache__"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                        "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert not re.search(r"warning|deprecat", r.stdout + r.stderr, re.I), r.stdout[-3000:] + r.stderr[-3000:]
    import zipfile

    (wheel,) = (tmp_path / "dist").glob("nanorepro-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        metadata = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    bundled = {f"nanorepro/bundled/{p.name}" for p in (REPO / "nanorepro" / "bundled").iterdir() if p.is_file()}
    assert bundled <= names and "nanorepro/bundled/tinyshakespeare.txt.gz" in bundled
    assert "License-Expression: MIT" in metadata and "License-File: LICENSE" in metadata
    assert "License-File: nanorepro/bundled/LICENSE-gpt-2" in metadata
