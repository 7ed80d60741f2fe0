"""Every command the platform runs, on a node or on this host, is built from an argument list.

A check of the source (``ast``), so that new code is held to it too: only
:meth:`cloudml_os.remote.ssh.NodeSession._exec` hands a command line to SSH, only ``run`` calls it, with
what :func:`~cloudml_os.remote.ssh.build_command` quoted; no caller passes a string (literal, f-string,
concatenation or ``%``/``format``) where an argv goes; local processes start from lists, never a shell.
What the quoting itself guarantees is proven by running it in tests/unit/test_remote_commands.py.
"""

from __future__ import annotations

import ast
from pathlib import Path

import cloudml_os

PACKAGE = Path(cloudml_os.__file__).parent
ARGV_METHODS = {"run": 0, "start_process": 1, "start_process_argv": 1, "build_command": 0, "quote_argv": 0}
SUBPROCESS_FUNCTIONS = {"run", "Popen", "call", "check_call", "check_output"}


def _sources() -> list[tuple[Path, ast.Module]]:
    return [(path, ast.parse(path.read_text(), str(path))) for path in sorted(PACKAGE.rglob("*.py"))
            if "node_modules" not in path.parts]


def _is_string_expression(node: ast.AST) -> bool:
    """A literal string, an f-string, or a string made by ``+``, ``%`` or ``.format``."""
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str)
    if isinstance(node, ast.JoinedStr):
        return True
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add | ast.Mod):
        return _is_string_expression(node.left) or _is_string_expression(node.right)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "format":
        return _is_string_expression(node.func.value)
    return False


def _calls(tree: ast.Module) -> list[ast.Call]:
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call)]


def _name(call: ast.Call) -> str:
    func = call.func
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""


def test_only_the_ssh_session_hands_a_command_line_to_ssh_and_only_through_build_command():
    exec_calls = [(path, call) for path, tree in _sources() for call in _calls(tree) if _name(call) == "exec_command"]
    assert [(path.name, call.args[0].id) for path, call in exec_calls] == [("ssh.py", "command")]
    ssh = ast.parse((PACKAGE / "remote" / "ssh.py").read_text())
    callers = [function.name for function in ast.walk(ssh) if isinstance(function, ast.FunctionDef)
               for call in _calls(function) if _name(call) == "_exec"]
    assert callers == ["run"]
    run = next(f for f in ast.walk(ssh) if isinstance(f, ast.FunctionDef) and f.name == "run")
    built = [node for node in ast.walk(run) if isinstance(node, ast.Assign)
             and isinstance(node.value, ast.Call) and _name(node.value) == "build_command"]
    assert [target.id for node in built for target in node.targets] == ["command"]


def test_no_caller_passes_a_string_where_an_argv_goes():
    offenders = []
    for path, tree in _sources():
        for call in _calls(tree):
            position = ARGV_METHODS.get(_name(call))
            if position is None or len(call.args) <= position:
                continue
            if _is_string_expression(call.args[position]):
                offenders.append(f"{path.relative_to(PACKAGE)}:{call.lineno}")
    assert not offenders, offenders


def test_local_processes_start_from_lists_without_a_shell():
    offenders = []
    for path, tree in _sources():
        for call in _calls(tree):
            if not (isinstance(call.func, ast.Attribute) and isinstance(call.func.value, ast.Name)):
                continue
            module, function = call.func.value.id, call.func.attr
            if (module, function) in {("os", "system"), ("os", "popen")}:
                offenders.append(f"{path.relative_to(PACKAGE)}:{call.lineno} os.{function}")
            if module == "subprocess" and function in SUBPROCESS_FUNCTIONS:
                shell = [k for k in call.keywords if k.arg == "shell"]
                if shell or (call.args and _is_string_expression(call.args[0])):
                    offenders.append(f"{path.relative_to(PACKAGE)}:{call.lineno} subprocess.{function}")
    assert not offenders, offenders


def test_the_check_recognises_string_commands():
    """The detector itself: what it must flag and what it must let through."""
    flagged = ['"ls -l"', 'f"ls {x}"', '"ls " + x', '"ls %s" % x', '"ls {}".format(x)']
    allowed = ['["ls", "-l"]', '("ls", x)', "argv", "[*base, x]", "script_argv(SCRIPT, x)"]
    assert all(_is_string_expression(ast.parse(source, mode="eval").body) for source in flagged)
    assert not any(_is_string_expression(ast.parse(source, mode="eval").body) for source in allowed)
