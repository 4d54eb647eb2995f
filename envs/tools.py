"""Tools for the policy, and an environment that lets it use them (env name `math_tools`).

Tool calls are parsed from the policy's text in one format:

    <tool name="calculator">2 * (3 + 4)</tool>
    <tool name="python">print(sum(range(10)))</tool>

A reply holding tool calls is a turn that asks for tools: the environment runs each (at most
`max_calls_per_turn`) and answers with their outputs, as one environment message
(`<result name="...">...</result>` per call), which the rollout loop masks from the loss. A
reply with no tool call is the final answer, scored by envs.math.is_correct.

`calculator` evaluates arithmetic (+ - * / // % **, parentheses, numbers) from the syntax tree,
never with eval. `python` runs the code in a separate Python process with a CPU-time limit, a
memory limit, a bound on the output kept, no inherited environment, and sockets refused (the
socket module is replaced before the code runs; this keeps honest code off the network, it
is not a security boundary against hostile code: run untrusted code in a container).
"""
from __future__ import annotations

import ast
import operator
import os
import re
import subprocess
import sys
import tempfile

from envs.base import Environment, StepResult, last_reply
from envs.math import MathEnv, is_correct

TOOL_CALL = re.compile(r'<tool\s+name="(\w+)"\s*>(.*?)</tool>', re.DOTALL)

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def calculator(expression: str) -> str:
    """The value of an arithmetic expression, or an error line."""
    def evaluate(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left, right = evaluate(node.left), evaluate(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > 1000:
                raise ValueError("exponent too large")
            return _BINARY[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](evaluate(node.operand))
        raise ValueError(f"not arithmetic: {ast.dump(node)[:60]}")
    try:
        result = evaluate(ast.parse(expression.strip(), mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError, RecursionError) as e:
        return f"error: {type(e).__name__}: {e}"
    if isinstance(result, float) and result.is_integer() and abs(result) < 1e15:
        result = int(result)
    return str(result)


_PRELUDE = '''
import resource, socket, sys
resource.setrlimit(resource.RLIMIT_CPU, ({cpu}, {cpu}))
resource.setrlimit(resource.RLIMIT_AS, ({mem}, {mem}))
def _refused(*a, **k):
    raise PermissionError("network access is not allowed in this sandbox")
socket.socket = _refused
socket.create_connection = _refused
socket.getaddrinfo = _refused
del resource, socket, _refused
'''


def run_python(code: str, timeout_s: float = 5.0, memory_mb: int = 256, max_output: int = 4000) -> str:
    """Run `code` in a fresh Python process under limits; its stdout and stderr (at most
    `max_output` characters, marked when cut), or why it was stopped."""
    prelude = _PRELUDE.format(cpu=max(1, int(timeout_s)), mem=memory_mb * 2**20)
    with tempfile.TemporaryDirectory(prefix="asyncrl-python-") as work:
        path = os.path.join(work, "main.py")
        with open(path, "w") as f:
            f.write(prelude + "\n" + code)
        try:
            with tempfile.TemporaryFile() as out:
                process = subprocess.Popen([sys.executable, "-I", "-S", path], stdin=subprocess.DEVNULL,
                                           stdout=out, stderr=subprocess.STDOUT, cwd=work, env={"PATH": "/usr/bin:/bin"})
                try:
                    code_ = process.wait(timeout_s + 1.0)
                except subprocess.TimeoutExpired:
                    process.kill()
                    try:
                        process.wait(5.0)
                    except subprocess.TimeoutExpired:   # stuck in the kernel: say so, do not wait on it
                        return (f"error: the code ran past its {timeout_s:g} s limit; its process "
                                f"{process.pid} did not exit within 5 s of SIGKILL")
                    return f"error: the code ran past its {timeout_s:g} s limit and was stopped"
                out.seek(0)
                data = out.read(max_output + 1).decode("utf-8", "replace")
        except OSError as e:
            return f"error: could not run the code: {e}"
    text = data[:max_output] + ("\n[output cut]" if len(data) > max_output else "")
    if code_ < 0 or code_ == 137:
        text += f"\nerror: the code was stopped (signal {-code_ if code_ < 0 else 9}: a time or memory limit)"
    return text


TOOLS = {"calculator": calculator, "python": run_python}


def tool_calls(text: str) -> list:
    """[(name, argument)] of the tool calls in text, in order."""
    return [(m.group(1), m.group(2)) for m in TOOL_CALL.finditer(text)]


class MathToolsEnv(Environment):
    """Math questions (envs.math sources) the policy may answer with tool calls first."""

    def __init__(self, tools: str = "calculator,python", max_calls_per_turn: int = 4, python_timeout_s: float = 5.0,
                 python_memory_mb: int = 256, **math_args):
        self.tools = [t.strip() for t in tools.split(",") if t.strip()]
        unknown = [t for t in self.tools if t not in TOOLS]
        if unknown:
            raise ValueError(f"unknown tools {unknown}; known: {sorted(TOOLS)}")
        self.math = MathEnv(**math_args)
        self.max_calls = max_calls_per_turn
        self.python_limits = dict(timeout_s=python_timeout_s, memory_mb=python_memory_mb)
        self.task: dict = {}

    def sample(self, rng):
        return self.math.sample(rng)

    def reset(self, task: dict) -> list:
        self.task = task
        usage = " ".join(f'<tool name="{t}">...</tool>' for t in self.tools)
        return [{"role": "system", "content": f"You may use tools, one per tag: {usage}. Their results come back "
                                              f"to you. When you know the answer, reply without a tool call."},
                *self.math.reset(task)]

    def step(self, messages: list) -> StepResult:
        calls = tool_calls(last_reply(messages))
        if not calls:
            correct = is_correct(last_reply(messages), self.task["answer"])
            return StepResult(reward=float(correct), done=True, info={"answer": self.task["answer"]})
        results = []
        for name, argument in calls[:self.max_calls]:
            if name not in self.tools:
                output = f"error: no tool {name!r}; use one of {self.tools}"
            elif name == "python":
                output = run_python(argument, **self.python_limits)
            else:
                output = TOOLS[name](argument)
            results.append(f'<result name="{name}">{output}</result>')
        if len(calls) > self.max_calls:
            results.append(f"(only the first {self.max_calls} tool calls of a turn run)")
        return StepResult([{"role": "user", "content": "\n".join(results)}], reward=0.0, done=False,
                          info={"tool_calls": len(calls)})
