"""The size budget of tools/size.py (issue 19): the repo passes, a long method file needs a `# size:` reason."""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("loraplex_size_tool", ROOT / "tools" / "size.py")
assert _spec is not None and _spec.loader is not None
size = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = size  # dataclasses look the module up
_spec.loader.exec_module(size)

LONG_BODY = "".join(f"x{i} = {i}\n" for i in range(300))


def make_package(tmp_path: Path, body: str) -> Path:
    package = tmp_path / "loraplex"
    (package / "adapters").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "adapters" / "__init__.py").write_text("")
    (package / "adapters" / "_helper.py").write_text(LONG_BODY)  # private: not a method file
    (package / "adapters" / "big.py").write_text(body)
    return package


def test_repo_is_within_budget():
    assert size.check() == []
    assert size.main(["--check", "--top", "3"]) == 0


def test_long_method_file_without_reason_fails(tmp_path):
    package = make_package(tmp_path, '"""A long method."""\n' + LONG_BODY)
    failures = size.check(package)
    assert len(failures) == 1
    assert "loraplex/adapters/big.py" in failures[0] and "301" in failures[0] and "250" in failures[0]


def test_long_method_file_with_reason_passes(tmp_path):
    reason = "# size: three hundred assignments, for the test\n"
    package = make_package(tmp_path, '"""A long method."""\n' + reason + LONG_BODY)
    assert size.check(package) == []
    (count,) = [c for c in size.count_package(package) if c.path.endswith("big.py")]
    assert count.reason == "three hundred assignments, for the test"


def test_total_budget(tmp_path):
    package = make_package(tmp_path, "x = 1\n")
    assert size.check(package, budget=10_000) == []
    (failure,) = size.check(package, budget=100)
    assert "301 code lines" in failure and "budget of 100" in failure


def test_docstrings_comments_and_blanks_are_not_code():
    source = '''"""Module docstring,
over two lines."""

# a comment
import math  # a trailing comment counts as code


class A:
    """Class docstring."""

    def f(self):
        """Function
        docstring.
        """
        s = """a string that is not a docstring:
        code"""
        return s


async def g():
    """One line."""
    return math.pi
'''
    c = size.count_source(source)
    assert size.docstring_lines(source) == {1, 2, 9, 12, 13, 14, 21}
    assert c.code == 8  # import, class, def, the two lines of s, return, async def, return
    assert c.code_and_doc == 15
    assert c.reason is None
