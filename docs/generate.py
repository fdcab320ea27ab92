"""
Regenerate the parts of the docs that are read from the code: the configuration table of each trainer page and the
API reference.

    python docs/generate.py           # rewrite the generated sections in place
    python docs/generate.py --check   # exit 1, listing the stale pages, if any generated section is out of date

Every page section written here sits between two markers, `<!-- NAME:start -->` and `<!-- NAME:end -->`; the text
outside the markers is written by hand and left alone.

- `config-table:<ClassName>`: the fields a trl_tip config adds to its TRL parent, or whose default it changes, with
  their type, default and help text (the dataclass field's `metadata["help"]`). Every public name of `trl_tip` that
  ends in `Config` needs a page in `CONFIG_PAGES` (one line per trainer) holding these markers.
- `api-reference` in `api.md`: every name of `trl_tip.__all__`, with its signature and the description part of its
  docstring.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import inspect
import re
import sys
from pathlib import Path


DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent

# Config class -> the docs page (relative to docs/) that documents its trainer.
CONFIG_PAGES = {
    "TipDistillConfig": "tip_distill.md",
    "OPSDCConfig": "opsdc.md",
    "PacedConfig": "paced.md",
    "ACEGRPOConfig": "ace_grpo.md",
}

API_PAGE = "api.md"

# Docstring lines that open a section after the description (HF doc-builder style).
_SECTION = re.compile(r"^(Args|Arguments|Parameters|Returns|Yields|Raises|Attributes|Example|Examples)\s*:\s*$")
# [`name`] and [`~module.name`] cross-references of the HF doc-builder, not followed by a Markdown link target.
_XREF = re.compile(r"\[`(~?)([\w.]+)`\](?!\()")


class DocsError(RuntimeError):
    """The code and the docs pages cannot be reconciled (a page or marker is missing, a field has no help text)."""


def _public_api():
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    trl_tip = importlib.import_module("trl_tip")
    return trl_tip, [(name, getattr(trl_tip, name)) for name in trl_tip.__all__]


def config_classes() -> dict[str, type]:
    """The public trl_tip config dataclasses (names of `trl_tip.__all__` that end in `Config`)."""
    _, api = _public_api()
    return {name: obj for name, obj in api if name.endswith("Config") and dataclasses.is_dataclass(obj)}


def _trl_parent(cls: type) -> type:
    """The nearest dataclass base defined outside trl_tip (the TRL config the class extends)."""
    for base in cls.__mro__[1:]:
        if dataclasses.is_dataclass(base) and not base.__module__.startswith("trl_tip"):
            return base
    raise DocsError(f"{cls.__name__} extends no dataclass outside trl_tip.")


def _default(field: dataclasses.Field):
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def _literal(value) -> str:
    if value is dataclasses.MISSING:
        return "required"
    if isinstance(value, str):
        text = '"' + value + '"'
    elif hasattr(value, "value") and type(value).__module__ != "builtins":  # enum members
        text = '"' + str(value.value) + '"'
    else:
        text = repr(value)
    return f"`{text}`"


def _annotation(annotation) -> str:
    if isinstance(annotation, str):
        return annotation
    # `transformers.modeling_utils.PreTrainedModel` -> `PreTrainedModel`, as the classes read in string annotations.
    return re.sub(r"\b(?:[A-Za-z_]\w*\.)+([A-Za-z_]\w*)", r"\1", inspect.formatannotation(annotation))


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _declared_type(cls: type, name: str):
    """The annotation of field `name` as written in the class body (argument parsers rewrite `Field.type` in place)."""
    for klass in cls.__mro__:
        annotations = klass.__dict__.get("__annotations__", {})
        if name in annotations:
            return annotations[name]
    raise DocsError(f"{cls.__name__}.{name} has no annotation.")


def config_table(cls: type) -> str:
    """Markdown table of the fields `cls` adds to its TRL parent config or whose default it changes."""
    parent = _trl_parent(cls)
    parent_fields = {field.name: field for field in dataclasses.fields(parent)}
    rows = []
    for field in dataclasses.fields(cls):
        inherited = parent_fields.get(field.name)
        default = _default(field)
        if inherited is not None:
            parent_default = _default(inherited)
            if default == parent_default and field.metadata.get("help") == inherited.metadata.get("help"):
                continue
        help_text = field.metadata.get("help")
        if not help_text:
            raise DocsError(f"{cls.__name__}.{field.name} has no metadata['help'] to document it with.")
        default_text = _literal(default)
        if inherited is not None and default != _default(inherited):
            default_text += f" (TRL: {_literal(_default(inherited))})"
        # Unions read "A or B": a pipe inside a code span would need escaping that not every renderer undoes.
        type_text = " or ".join(part.strip() for part in _annotation(_declared_type(cls, field.name)).split("|"))
        rows.append(f"| `{field.name}` | `{_cell(type_text)}` | {default_text} | {_cell(help_text)} |")
    if not rows:
        raise DocsError(f"{cls.__name__} adds nothing to {parent.__name__}: there is no table to write.")
    header = [
        f"Generated from `{cls.__name__}` by `docs/generate.py`: the fields it adds to `{_qualified(parent)}` or "
        f"whose default it changes. Every other `{parent.__name__}` field applies unchanged.",
        "",
        "| field | type | default | meaning |",
        "|---|---|---|---|",
    ]
    return "\n".join(header + rows)


def _description(obj) -> str:
    """The description part of a docstring (before its first section), with doc-builder references made code."""
    doc = inspect.getdoc(obj) or ""
    kept = []
    for line in doc.splitlines():
        if _SECTION.match(line) or line.startswith("```") or line.startswith("> [!"):
            break
        kept.append(line)
    text = "\n".join(kept).strip()

    def reference(match):
        tilde, target = match.groups()
        name = target.split(".")[-1]
        if "." not in target and name in _public_names():
            return f"[`{name}`](#{name.lower()})"
        return f"`{target}`"

    return _XREF.sub(reference, text)


def _public_names() -> list[str]:
    trl_tip, _ = _public_api()
    return list(trl_tip.__all__)


def _safe_repr(value) -> str:
    text = repr(value)
    if " at 0x" in text:  # an object whose repr is an address: not stable between runs
        return type(value).__name__
    return text


def _signature_lines(name: str, signature: inspect.Signature) -> str:
    params = []
    previous_kind = None
    for parameter in signature.parameters.values():
        if parameter.kind is parameter.KEYWORD_ONLY and previous_kind not in (parameter.VAR_POSITIONAL,
                                                                               parameter.KEYWORD_ONLY):
            params.append("*")
        previous_kind = parameter.kind
        text = parameter.name
        if parameter.kind is parameter.VAR_POSITIONAL:
            text = "*" + text
        elif parameter.kind is parameter.VAR_KEYWORD:
            text = "**" + text
        if parameter.annotation is not parameter.empty:
            text += f": {_annotation(parameter.annotation)}"
        if parameter.default is not parameter.empty:
            text += (" = " if parameter.annotation is not parameter.empty else "=") + _safe_repr(parameter.default)
        params.append(text)
    returns = ""
    if signature.return_annotation not in (signature.empty, None, "None"):
        returns = f" -> {_annotation(signature.return_annotation)}"
    one_line = f"{name}({', '.join(params)}){returns}"
    if len(one_line) <= 100:
        return one_line
    body = "".join(f"    {param},\n" for param in params)
    return f"{name}(\n{body}){returns}"


def _concrete_init(cls: type) -> tuple[type, inspect.Signature]:
    """The class whose constructor signature `cls` really takes (skipping `__init__(*args, **kwargs)` forwarders)."""
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        signature = inspect.signature(init)
        kinds = {parameter.kind for parameter in list(signature.parameters.values())[1:]}
        if kinds <= {inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD}:
            continue
        return klass, signature.replace(parameters=list(signature.parameters.values())[1:])
    raise DocsError(f"Cannot find the constructor signature of {cls.__name__}.")


def _qualified(cls: type) -> str:
    module = cls.__module__
    if module.startswith(("trl.", "transformers.")):
        module = module.split(".")[0]
    return f"{module}.{cls.__name__}"


def _assigns(module, name: str) -> bool:
    """Whether `module`'s source binds `name` by a top-level assignment (rather than importing it)."""
    try:
        tree = ast.parse(inspect.getsource(module))
    except (OSError, TypeError):
        return False
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, ast.AnnAssign) else []
        if any(isinstance(target, ast.Name) and target.id == name for target in targets):
            return True
    return False


def _defining_module(name: str, obj) -> str:
    module = getattr(obj, "__module__", None)
    if isinstance(module, str) and module.startswith("trl_tip"):
        return module
    for module_name, module in sorted(sys.modules.items()):
        if module_name.startswith("trl_tip.") and getattr(module, name, None) is obj and _assigns(module, name):
            return module_name
    raise DocsError(f"Cannot find the trl_tip module that defines {name}.")


def _api_entry(name: str, obj) -> list[str]:
    lines = [f"### {name}", ""]
    module = _defining_module(name, obj)
    if inspect.isclass(obj):
        bases = [base for base in obj.__bases__ if base is not object]
        base_text = ", ".join(f"`{_qualified(base)}`" for base in bases)
        lines.append(f"Class in `{module}`" + (f", subclass of {base_text}." if bases else "."))
        lines.append("")
        description = _description(obj)
        if description:
            lines += [description, ""]
        if name in CONFIG_PAGES:
            parent = _trl_parent(obj)
            lines.append(
                f"A dataclass taking every field of `{_qualified(parent)}` as a keyword argument; the fields it adds "
                f"or changes are listed on [its trainer's page]({CONFIG_PAGES[name]}#configuration)."
            )
            lines.append("")
        else:
            owner, signature = _concrete_init(obj)
            if owner is not obj:
                lines.append(f"Takes the arguments of `{_qualified(owner)}`, to which it forwards them:")
                lines.append("")
            lines += ["```python", _signature_lines(name, signature), "```", ""]
    elif callable(obj):
        lines.append(f"Function in `{module}`.")
        lines.append("")
        lines += ["```python", _signature_lines(name, inspect.signature(obj)), "```", ""]
        description = _description(obj)
        if description:
            lines += [description, ""]
    else:
        lines.append(f"Constant in `{module}`, a `{type(obj).__name__}`:")
        lines.append("")
        if isinstance(obj, dict) and all(isinstance(value, str) for value in obj.values()):
            lines += ["| key | value |", "|---|---|"]
            lines += [f"| `{_cell(str(key))}` | {_cell(value)} |" for key, value in obj.items()]
        else:
            lines += ["```python", _safe_repr(obj), "```"]
        lines.append("")
    return lines


def api_reference() -> str:
    """Markdown for every public name of `trl_tip`: trainers, configs, other classes, functions, constants."""
    _, api = _public_api()
    groups = {"Trainers": [], "Configurations": [], "Other classes": [], "Functions": [], "Constants": []}
    for name, obj in api:
        if inspect.isclass(obj):
            group = "Trainers" if name.endswith("Trainer") else "Configurations" if name.endswith("Config") else (
                "Other classes")
        elif callable(obj):
            group = "Functions"
        else:
            group = "Constants"
        groups[group].append((name, obj))
    lines = []
    for title, members in groups.items():
        if not members:
            continue
        lines += [f"## {title}", ""]
        for name, obj in members:
            lines += _api_entry(name, obj)
    return "\n".join(lines).rstrip()


def _replace_section(text: str, marker: str, content: str, page: str) -> str:
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        raise DocsError(f"docs/{page} needs exactly one '{start}' followed by one '{end}'.")
    head, rest = text.split(start)
    _, tail = rest.split(end)
    return f"{head}{start}\n\n{content}\n\n{end}{tail}"


def render_pages() -> dict[Path, str]:
    """Every page with generated sections, as it should read now: path -> full text."""
    classes = config_classes()
    unmapped = sorted(set(classes) - set(CONFIG_PAGES))
    if unmapped:
        raise DocsError(
            f"No docs page for {', '.join(unmapped)}: add a line to CONFIG_PAGES in docs/generate.py "
            "and the config-table markers to that page."
        )
    stale_mapping = sorted(set(CONFIG_PAGES) - set(classes))
    if stale_mapping:
        raise DocsError(f"CONFIG_PAGES names {', '.join(stale_mapping)}, which trl_tip does not export.")

    pages: dict[Path, str] = {}

    def page_text(page: str) -> str:
        path = DOCS / page
        if path not in pages:
            if not path.exists():
                raise DocsError(f"docs/{page} does not exist.")
            pages[path] = path.read_text(encoding="utf-8")
        return pages[path]

    for name, cls in classes.items():
        page = CONFIG_PAGES[name]
        pages[DOCS / page] = _replace_section(page_text(page), f"config-table:{name}", config_table(cls), page)
    pages[DOCS / API_PAGE] = _replace_section(page_text(API_PAGE), "api-reference", api_reference(), API_PAGE)
    return pages


def stale_pages() -> list[Path]:
    """Pages whose generated sections differ from what the code gives now."""
    return [path for path, text in render_pages().items() if path.read_text(encoding="utf-8") != text]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="Only report stale pages; exit 1 if there are any.")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_pages()
        for path in stale:
            print(f"{path.relative_to(ROOT)} is out of date: run `python docs/generate.py`.")
        return 1 if stale else 0
    for path, text in render_pages().items():
        if path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
            print(f"updated {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
