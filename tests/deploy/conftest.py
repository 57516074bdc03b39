"""Session fixtures of the deploy tests: the tools and every chart variant rendered once."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import pytest

from tests.deploy.tooling import VARIANTS, Doc, load_yaml, template, tools_bin


@pytest.fixture(scope="session")
def tools() -> Path:
    return tools_bin()


@pytest.fixture(scope="session")
def helm_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("helm-home")


@pytest.fixture(scope="session")
def rendered_text(tools: Path, helm_home: Path) -> Dict[str, str]:
    texts = {}
    for name, values in VARIANTS.items():
        result = template(tools, helm_home, values=values)
        assert result.returncode == 0, f"helm template ({name}) failed:\n{result.stderr}"
        texts[name] = result.stdout
    return texts


@pytest.fixture(scope="session")
def rendered(tools: Path, rendered_text: Dict[str, str]) -> Dict[str, List[Doc]]:
    return dict(zip(rendered_text, load_yaml(tools, *rendered_text.values())))
