"""Tools: the call format the policy writes, the built-in tools, and running a call with a deadline.

Calls are parsed in the Hermes / Qwen convention by default: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
anywhere in an assistant turn, several per turn allowed (`PARSERS` is a name -> function dict; add one for another
template's format). A malformed call is not dropped: it becomes a `ToolCall` with an `error`, and the model sees that
error as the tool's answer.
"""

from __future__ import annotations

import ast
import asyncio
import atexit
import concurrent.futures
import inspect
import json
import math
import operator
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class ToolCall:
    name: str
    arguments: dict = field(default_factory=dict)
    error: str | None = None
    """Why the call cannot be made (bad JSON, no name, arguments not an object); the answer the model gets."""


# ================================================================================================ parsing
_HERMES = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


def parse_hermes(text: str) -> list[ToolCall]:
    """Every `<tool_call>{json}</tool_call>` block of `text`, in order (an unclosed block is not a call)."""
    calls = []
    for body in _HERMES.findall(text):
        try:
            obj = json.loads(body.strip())
        except json.JSONDecodeError as exc:
            calls.append(ToolCall("", error=f"the tool call is not valid JSON ({exc.msg} at char {exc.pos})"))
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            calls.append(ToolCall("", error='a tool call needs {"name": "<tool>", "arguments": {...}}'))
            continue
        args = obj.get("arguments", obj.get("parameters", {}))
        if isinstance(args, str):  # some models write the arguments as a JSON string
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                pass
        if not isinstance(args, dict):
            calls.append(ToolCall(obj["name"], error=f"the arguments of '{obj['name']}' must be a JSON object"))
            continue
        calls.append(ToolCall(obj["name"], args))
    return calls


PARSERS: dict[str, Callable[[str], list[ToolCall]]] = {"hermes": parse_hermes}


def format_hermes(name: str, arguments: dict) -> str:
    """The text of one call in the Hermes format (what a warm start teaches, what scripted turns write)."""
    return "<tool_call>" + json.dumps({"name": name, "arguments": arguments}) + "</tool_call>"


# ================================================================================================ built-in tools
_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}
_FUNCS = {"sqrt": math.sqrt, "abs": abs, "round": round, "min": min, "max": max}


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression and return the result.

    Args:
        expression: the expression, e.g. "123 * 456" or "(7 + 3) / 4"; + - * / // % ** and sqrt, abs, round, min, max
    """

    # A small evaluator over Python's own parser (no eval: the model's text is untrusted); exponents are capped so
    # a call cannot spend minutes on 9**9**9.
    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > 64:
                raise ValueError("exponent too large")
            return _BINARY[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](ev(node.operand))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCS:
            return _FUNCS[node.func.id](*[ev(a) for a in node.args])
        raise ValueError(f"unsupported expression: {ast.unparse(node)[:40]}")

    try:
        value = ev(ast.parse(expression.replace("^", "**"), mode="eval"))
    except ZeroDivisionError:
        return "error: division by zero"
    except (SyntaxError, ValueError, TypeError, OverflowError) as exc:
        return f"error: {exc}"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        value = int(value)
    return str(value)


def python(code: str) -> str:
    """Run a Python program in a sandbox and return what it printed (stdout, then stderr).

    Args:
        code: the program; print what you want to see
    """
    from sandboxes import Job, SandboxError, open_backend  # the sandbox client is imported only when the tool runs

    try:
        pool = _sandbox_pool(open_backend)
        result = pool.run(Job(id="tool", code=code, tests="", timeout_s=10.0, memory_mb=256))
    except SandboxError as exc:
        return f"error: sandbox unavailable ({exc})"
    parts = [result.stdout or "", result.stderr or ""]
    status = getattr(result.status, "value", result.status)
    if status != "passed" and result.error:  # a traceback, a compile error, the limit that was hit
        parts.append(result.error)
    if status in ("timeout", "memory_exceeded", "infra_error"):
        parts.append(f"[{status}]")
    return _truncate("\n".join(p.strip() for p in parts if p.strip()) or "(no output)")


_POOL_LOCK = threading.Lock()
_POOL = None


def _sandbox_pool(open_backend):
    """One warm sandbox pool per process, opened on the first `python` call, closed at exit."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = open_backend()
            atexit.register(close_sandbox)
        return _POOL


def close_sandbox() -> None:
    """Close the `python` tool's sandbox pool (the next call opens a new one)."""
    global _POOL
    with _POOL_LOCK:
        pool, _POOL = _POOL, None
    if pool is not None:
        pool.close()


def _truncate(text: str, limit: int = 2000) -> str:
    return text if len(text) <= limit else text[:limit] + f"\n[... {len(text) - limit} more characters]"


BUILTIN_TOOLS: dict[str, Callable] = {"calculator": calculator, "python": python}


# ================================================================================================ calling
class ToolRunner:
    """Runs tool calls with a per-call deadline, sync or async, from any number of episodes at once.

    Sync tools run in a thread pool, async ones on one event loop in a background thread. Python cannot kill a
    thread: a sync tool that spins past its deadline is answered with an error and left running in its thread
    (tools that may spin belong in the sandbox, as the built-in `python` is).
    """

    def __init__(self, timeout_s: float, workers: int = 8) -> None:
        self.timeout_s = timeout_s
        self._threads = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="rlk2-tool")
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self._loop.run_forever, name="rlk2-tool-loop", daemon=True)
        self._loop_thread.start()

    def submit(self, fn: Callable, arguments: dict) -> concurrent.futures.Future:
        """Start `fn(**arguments)`; the future's result is its answer (str), or raises."""
        if inspect.iscoroutinefunction(fn):
            return asyncio.run_coroutine_threadsafe(fn(**arguments), self._loop)
        return self._threads.submit(fn, **arguments)

    def answer(self, future: concurrent.futures.Future, name: str) -> tuple[str, bool]:
        """(the observation, whether it is an error) of a submitted call, waiting at most the deadline."""
        try:
            value = future.result(timeout=self.timeout_s)
        except concurrent.futures.TimeoutError:
            future.cancel()
            return f"error: tool '{name}' timed out after {self.timeout_s:g} s", True
        except TypeError as exc:  # wrong or missing arguments
            return f"error: {name}: {exc}", True
        except Exception as exc:
            return f"error: tool '{name}' failed: {type(exc).__name__}: {exc}", True
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        return _truncate(text), text.startswith("error:")

    def close(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)
        self._loop.call_soon_threadsafe(self._loop.stop)
