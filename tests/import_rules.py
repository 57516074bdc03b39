"""The ``allowed`` import-linter contract: who may import whom, as an allow-list.

import-linter's own contracts forbid what is listed; this one allows only what is listed. Each
module of ``source_modules`` may import, besides its own package and the standard library,
only the modules and packages of ``allowed_modules`` (ours by module path, external ones by
top-level name). Lazy imports inside functions and ``TYPE_CHECKING`` imports count too.
``pyproject.toml`` holds the contracts (``[tool.importlinter]``); docs/architecture.md says
why each holds.
"""

from __future__ import annotations

import sys
from typing import Any, Dict, List, Set

from importlinter import Contract, ContractCheck, fields, output


class AllowedImportsContract(Contract):
    """Configuration options:
    - source_modules: the modules (packages count with every descendant) this contract binds.
    - allowed_modules: what they may import: a module, a package (and its descendants) or an
      external distribution's top-level name.
    """

    type_name = "allowed"

    source_modules = fields.ListField(subfield=fields.ModuleField())
    allowed_modules = fields.ListField(subfield=fields.StringField())

    def check(self, graph: Any, verbose: bool) -> ContractCheck:
        allowed: List[str] = list(self.allowed_modules)  # type: ignore[call-overload]
        stdlib: Set[str] = set(sys.stdlib_module_names) | {"__future__"}
        broken: List[Dict[str, Any]] = []
        for source in self.source_modules:  # type: ignore[attr-defined]
            root = source.name
            modules = {root} | graph.find_descendants(root)
            for importer in sorted(modules):
                for imported in sorted(graph.find_modules_directly_imported_by(importer)):
                    top = imported.split(".")[0]
                    if (imported == root or imported.startswith(root + ".") or top in stdlib
                            or any(imported == a or imported.startswith(a + ".")
                                   for a in allowed)):
                        continue
                    lines = sorted(detail["line_number"] for detail in
                                   graph.get_import_details(importer=importer, imported=imported))
                    broken.append({"importer": importer, "imported": imported, "lines": lines})
        return ContractCheck(kept=not broken, metadata={"broken": broken})

    def render_broken_contract(self, check: ContractCheck) -> None:
        for link in check.metadata["broken"]:
            output.print_error(
                f"{link['importer']} imports {link['imported']} "
                f"(line {', '.join(map(str, link['lines']))}), which it is not allowed to import.")
            output.new_line()
