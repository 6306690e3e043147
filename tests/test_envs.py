"""envs/: the calculator, the Python sandbox's limits, tool-call formats, ToolEnv episodes and its knobs."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

from jaxrl_llm.envs import (CALL_FORMATS, LAST_TURN_NOTE, Calculator, Environment, EnvironmentBase, PythonSandbox,
                            Step, ToolCall, ToolEnv, ToolResult, format_tool_call, get_tool, make_env,
                            parse_tool_call, registered_envs, registered_tools, run_many)
from jaxrl_llm.errors import ConfigError
from jaxrl_llm.tasks import get_task
from jaxrl_llm.tasks.base import Example, RewardInputs

# ----------------------------------------------------------------------------- calculator

CALC = Calculator()


@pytest.mark.parametrize("expr, want", [
    ("123456789*987654321", "121932631112635269"),
    ("2+3*4", "14"), ("(2+3)*4", "20"), ("2**3**2", "512"), ("-5+2", "-3"), ("-(3-10)", "7"), ("--4", "4"),
    ("7/2", "3.5"), ("1/3", "0.333333333333"), ("1/3*3", "1"), ("10**30/10**28", "100"), ("7//2", "3"),
    ("-7//2", "-4"), ("-7%3", "2"), ("0.1+0.2", "0.3"), ("1.5*4", "6"), ("2**-2", "0.25"),
    ("2**0.5", "1.41421356237"), (" 12 * 34 = ", "408"), ("10**20", "100000000000000000000"),
])
def test_calculator_exact_results(expr, want):
    assert CALC(expr) == ToolResult(want, False)


@pytest.mark.parametrize("expr, why", [
    ("x+1", "names are not allowed"), ("abs(-1)", "function calls are not allowed"),
    ("__import__('os').system('ls')", "function calls are not allowed"), ("(1).real", "attributes are not allowed"),
    ("9**9**9", "exponent 387420489 too large"), ("(10**999)**999", "result too large"),
    ("2**10000", "result too large"), ("1" * 201, "expression too long"), ("1/0", "division by zero"),
    ("5%0", "division by zero"), ("'a'*3", "only numbers"), ("2^3", "operator '^' is not supported"),
    ("(-8)**0.5", "not a real number"), ("", "empty expression"), ("1+", "not an arithmetic expression"),
    ("[1, 2]", "unsupported syntax"), ("1e999", "too large"),
])
def test_calculator_rejects_without_raising(expr, why):
    result = CALC(expr)
    assert result.error and result.text.startswith("error: ") and why in result.text, result


def test_calculator_limits_are_knobs():
    assert Calculator(max_digits=5)("99999*9") == ToolResult("error: result too large (more than 5 digits)", True)
    assert Calculator(max_exponent=3)("2**4").error and not Calculator(max_exponent=4)("2**4").error
    assert Calculator(max_length=3)("1+23").error
    assert Calculator(precision=3)("2/3").text == "0.667"
    with pytest.raises(ValueError, match="max_digits=0"):
        Calculator(max_digits=0)


# ----------------------------------------------------------------------------- the Python sandbox

SANDBOX = PythonSandbox(timeout_s=1.5, cpu_s=1, memory_mb=256)


def test_sandbox_prints_and_imports():
    assert SANDBOX("print(sum(range(10)))") == ToolResult("45\n", False)
    r = SANDBOX("import math, json, itertools\n"
                "print(math.factorial(10), json.dumps([1]), len(list(itertools.permutations('abc'))))")
    assert r == ToolResult("3628800 [1] 6\n", False)


def test_sandbox_time_limit_kills_the_loop():
    r = SANDBOX("print('started', flush=True)\nwhile True: pass")
    assert r.error and r.text.startswith("started\n")
    assert re.search(r"error: (timed out after 1.5 s|CPU time limit of 1 s exceeded)$", r.text), r.text
    r = SANDBOX("import time; time.sleep(30)")  # not using CPU: the wall clock stops it
    assert r == ToolResult("error: timed out after 1.5 s", True)


def test_sandbox_memory_limit():
    r = SANDBOX("x = bytearray(2 * 10**9)\nprint('allocated')")
    assert r.error and "MemoryError" in r.text and "allocated" not in r.text


def test_sandbox_files_only_in_its_directory():
    r = SANDBOX("print(open('/etc/passwd').read())")
    assert r.error and "PermissionError" in r.text and "root:" not in r.text
    r = SANDBOX("import os; os.chdir('/etc'); print(open('passwd').read())")
    assert r.error and "root:" not in r.text
    assert SANDBOX("open('/tmp/sandbox_escape.txt', 'w')").error
    assert SANDBOX("open('../stdout', 'w')").error
    assert SANDBOX("import os; print(os.listdir('/'))").error
    r = SANDBOX("open('notes.txt', 'w').write('kept')\nprint(open('notes.txt').read())")
    assert r == ToolResult("kept\n", False)


def test_sandbox_no_network_no_processes():
    for code in ("import socket; socket.create_connection(('127.0.0.1', 9))",
                 "import socket; socket.socket().bind(('127.0.0.1', 0))",
                 "import subprocess; subprocess.run(['ls'])", "import os; os.system('ls')",
                 "import os; os.fork()", "import os; os.execv('/bin/ls', ['ls'])",
                 "import ctypes; ctypes.CDLL(None).system(b'ls')"):
        r = SANDBOX(code)
        assert r.error and "PermissionError: sandbox:" in r.text, (code, r)


def test_sandbox_environment_is_empty_and_directory_removed():
    os.environ["JAXRL_SANDBOX_SECRET"] = "leak"
    try:
        r = SANDBOX("import os; print(os.getcwd()); print('JAXRL_SANDBOX_SECRET' in os.environ)")
    finally:
        del os.environ["JAXRL_SANDBOX_SECRET"]
    cwd, leaked = r.text.split()
    assert not r.error and leaked == "False"
    assert os.path.basename(cwd) == "work" and not os.path.exists(os.path.dirname(cwd))


def test_sandbox_errors_and_output_limit():
    assert SANDBOX("print('a')\n1/0") == ToolResult("a\nerror: ZeroDivisionError: division by zero", True)
    assert SANDBOX("print(").text.startswith("error: SyntaxError")
    r = PythonSandbox(max_output_chars=50)("print('x' * 10000)")
    assert not r.error and len(r.text) == 50 and r.text.endswith("...[truncated]")
    r = PythonSandbox(max_output_chars=60)("print('x' * 10000)\n1/0")
    assert r.error and len(r.text) <= 60 and r.text.endswith("error: ZeroDivisionError: division by zero")


def test_run_many_keeps_order():
    results = run_many(SANDBOX, [f"print({i} * {i})" for i in range(4)] + ["1/0"], max_workers=3)
    assert [r.text for r in results[:4]] == ["0\n", "1\n", "4\n", "9\n"] and results[4].error
    assert run_many(CALC, ["2*3", "x"], max_workers=1) == [ToolResult("6"), CALC("x")]


def test_tool_registry():
    assert {"calculator", "python"} <= set(registered_tools())
    assert get_tool("python", timeout_s=2.0).timeout_s == 2.0
    with pytest.raises(ConfigError, match="Did you mean 'calculator'"):
        get_tool("calculater")


# ----------------------------------------------------------------------------- call formats

@pytest.mark.parametrize("fmt", sorted(CALL_FORMATS))
@pytest.mark.parametrize("argument", ["12*34", "print('</python>')\nprint({'a': 1})", "x = \"q\"\n  y", "ünï"])
def test_format_parse_round_trip(fmt, argument):
    if fmt == "tags" and "</python>" in argument:
        with pytest.raises(ValueError, match="contains </python>"):
            format_tool_call("python", argument, fmt)
        return
    text = format_tool_call("python", argument, fmt, parameter="code")
    assert parse_tool_call(f"Let me run it.\n{text}\nthen", ["calculator", "python"], fmt) == ToolCall("python",
                                                                                                      argument)


def test_parse_tags():
    tools = ["calculator", "python"]
    assert parse_tool_call("<calculator>1+2</calculator> <python>x</python>", tools, "tags") == ToolCall("calculator",
                                                                                                         "1+2")
    assert parse_tool_call("408", tools, "tags") is None
    assert parse_tool_call("<search>cats</search>", tools, "tags") is None  # not one of the tools
    call = parse_tool_call("<calculator>12*34", tools, "tags")
    assert call.name == "calculator" and call.argument == "" and "not closed" in call.error
    assert format_tool_call("calculator", "1+2", "tags") == "<calculator>1+2</calculator>"


def test_parse_json():
    tools = ["calculator"]
    good = '<tool_call>{"name": "calculator", "arguments": {"expression": "12*34"}}</tool_call>'
    assert parse_tool_call(good, tools, "json") == ToolCall("calculator", "12*34")
    as_string = '<tool_call>{"name": "calculator", "arguments": "{\\"expression\\": \\"5*5\\"}"}</tool_call>'
    assert parse_tool_call(as_string, tools, "json") == ToolCall("calculator", "5*5")
    assert parse_tool_call("the answer is 408", tools, "json") is None
    assert parse_tool_call("<calculator>1+2</calculator>", tools, "json") is None
    for text, why in [('<tool_call>{"name": "calculator", "arguments": {</tool_call>', "not valid JSON"),
                      ('<tool_call>{"name": "wolfram", "arguments": {"q": "1"}}</tool_call>', "unknown tool 'wolfram'"),
                      ('<tool_call>{"name": "calculator", "arguments": {"a": "1", "b": "2"}}</tool_call>',
                       "exactly one entry"),
                      ('<tool_call>{"name": "calculator", "arguments": {"a": [1]}}</tool_call>', "must be a string"),
                      ('<tool_call>{"name": "calculator"', "not closed"), ("<tool_call>[1]</tool_call>", '"name"')]:
        call = parse_tool_call(text, tools, "json")
        assert call is not None and call.argument == "" and why in call.error, (text, call)
    with pytest.raises(ValueError, match="Did you mean 'json'"):
        parse_tool_call("x", tools, "jsn")


# ----------------------------------------------------------------------------- ToolEnv

@pytest.fixture(scope="module")
def task():
    return get_task("arithmetic", min_digits=2, max_digits=3, operators=("*",))


@pytest.fixture(scope="module")
def example(task):
    return task.examples("train", 1, seed=0)[0]


def _product(example: Example) -> str:
    return f"{example.meta['a']}*{example.meta['b']}"


def test_call_then_correct_answer(task, example):
    env = make_env("tools", task, max_turns=4, call_reward=0.25)
    assert isinstance(env, Environment) and isinstance(env, EnvironmentBase)
    state = env.reset(example)
    step = env.step(state, f"I will compute it. <calculator>{_product(example)}</calculator>")
    assert step == Step(example.answer, 0.25, False, step.info)
    assert step.info["tool_call"] and step.info["tool"] == "calculator" and not step.info["tool_error"]
    assert step.info["correct"] is None
    step = env.step(state, example.answer)
    correct_reward = float(task.reward(RewardInputs([example.answer], [example], np.zeros(1), np.ones(1, bool), 8)
                                       ).scores[0])
    assert step.observation == "" and step.done and step.reward == correct_reward == 1.0
    assert step.info["final"] and step.info["correct"] is True and step.info["components"] == {"answer": 1.0}
    assert not step.info["tool_call"] and step.info["tool"] == ""
    assert (step.info["turns"], step.info["tool_calls"], step.info["tool_errors"]) == (2, 1, 0)
    with pytest.raises(ValueError, match="episode 0 is over"):
        env.step(state, "again")


def test_wrong_answer_and_direct_answer(task, example):
    env = make_env("tools", task)
    step = env.step(env.reset(example), str(int(example.answer) + 1))
    assert step.done and step.reward == 0.0 and step.info["correct"] is False and step.info["tool_calls"] == 0


def test_out_of_turns(task, example):
    env = make_env("tools", task, max_turns=2, call_reward=0.5)
    state = env.reset(example)
    first = env.step(state, f"<calculator>{_product(example)}</calculator>")
    assert first.observation == f"{example.answer}\n{LAST_TURN_NOTE}" and not first.done and first.reward == 0.5
    last = env.step(state, f"<calculator>{_product(example)}</calculator>")
    assert last == Step("", 0.0, True, last.info)
    assert last.info["out_of_turns"] and last.info["correct"] is False and last.info["tool_calls"] == 2
    no_note = make_env("tools", task, max_turns=2, answer_on_last_turn=False)
    assert no_note.step(no_note.reset(example), "<calculator>2*3</calculator>").observation == "6"


def test_tool_error_observation(task, example):
    env = make_env("tools", task, error_reward=-0.1, max_observation_chars=30)
    state = env.reset(example)
    step = env.step(state, "<calculator>import os</calculator>")
    assert step.observation == "error: not an a ...[truncated]"  # "error: not an arithmetic expression ..." cut
    assert step.reward == -0.1 and not step.done and step.info["tool_error"] and step.info["tool_errors"] == 1
    step = env.step(state, "<calculator>1+")  # malformed: an error observation, not a final answer
    assert step.observation == "error: <calcula ...[truncated]" and not step.done and step.reward == -0.1
    assert (step.info["tool_calls"], step.info["tool_errors"]) == (2, 2)
    wide = make_env("tools", task)
    step = wide.step(wide.reset(example), "<calculator>1+")
    assert step.observation == ("error: <calculator> is not closed; write the call as "
                                "<calculator>ARGUMENT</calculator>") and step.info["tool_error"]


def test_step_batch_mixes_calls_and_answers(task):
    examples = task.examples("train", 3, seed=1)
    env = make_env("tools", task, call_format="json", max_workers=2)
    states = [env.reset(e) for e in examples]
    turns = [format_tool_call("calculator", _product(examples[0]), "json", "expression"), examples[1].answer, "7"]
    steps = env.step_batch(states, turns)
    assert steps[0].observation == examples[0].answer and not steps[0].done
    bad = env.step(env.reset(examples[2]), "<tool_call>{not json}</tool_call>")
    assert bad.info["tool_call"] and bad.info["tool"] == "" and bad.info["tool_error"] and not bad.done
    assert bad.observation.startswith("error: the tool call is not valid JSON")
    assert steps[1].done and steps[1].info["correct"] is True and steps[1].reward == 1.0
    assert steps[2].done and steps[2].info["correct"] is False and steps[2].reward == 0.0
    with pytest.raises(ValueError, match="3 states but 2 turns"):
        env.step_batch(states, turns[:2])


def test_demonstration_runs_the_tools(task):
    for fmt in CALL_FORMATS:
        env = make_env("tools", task, call_format=fmt, max_turns=3)
        for example in task.examples("train", 4, seed=2):
            a, b = example.meta["a"], example.meta["b"]
            messages = env.demonstration(example, [f"{a}*{b}", ("calculator", f"{a}*{b}+0")])
            assert [m["role"] for m in messages] == ["assistant", "tool", "assistant", "tool", "assistant"]
            assert messages[1]["content"] == str(a * b)
            assert messages[3]["content"] == f"{a * b}\n{LAST_TURN_NOTE}"
            assert parse_tool_call(messages[0]["content"], ["calculator"], fmt) == ToolCall("calculator", f"{a}*{b}")
            assert messages[-1]["content"] == example.answer and task.is_correct(messages[-1]["content"], example)
    with pytest.raises(ValueError, match="leaves 2 turns"):
        env.demonstration(example, ["1", "2", "3"])
    with pytest.raises(ValueError, match="failed"):
        env.demonstration(example, ["x*2"])


def test_system_prompt(task):
    prompt = make_env("tools", task, tools=("calculator", "python"), call_format="json").system_prompt()
    assert "calculator (argument \"expression\")" in prompt and "python (argument \"code\")" in prompt
    assert CALL_FORMATS["json"] in prompt and "4 turns" in prompt and "\n" not in prompt
    assert EnvironmentBase().system_prompt() is None


def test_registry_names_the_nearest(task):
    assert "tools" in registered_envs()
    with pytest.raises(ConfigError, match=r"unknown environment 'tool'\. Did you mean 'tools'\?"):
        make_env("tool", task)
    with pytest.raises(ConfigError, match="max_turn.*did you mean 'max_turns'.*it accepts"):
        make_env("tools", task, max_turn=3)


@pytest.mark.parametrize("knob, value", [
    ("tools", ()), ("tools", ("calculater",)), ("tools", (42,)), ("tools", ("calculator", "calculator")),
    ("max_turns", 0), ("max_turns", 2.5), ("call_format", "xml"), ("call_reward", "high"),
    ("error_reward", float("nan")), ("max_observation_chars", 0), ("answer_on_last_turn", "yes"),
    ("max_workers", 0),
])
def test_every_knob_is_validated(task, knob, value):
    with pytest.raises(ConfigError, match=rf"environment 'tools'.*{knob}"):
        make_env("tools", task, **{knob: value})


def test_tool_env_needs_a_task():
    with pytest.raises(ConfigError, match="task=.*is not a Task"):
        ToolEnv("arithmetic")


def test_tool_options_set_a_named_tools_limits_and_are_checked():
    from jaxrl_llm.envs import make_env
    task = get_task("arithmetic")
    env = make_env("tools", task, tools=("python",), tool_options={"python": {"timeout_s": 2.0, "memory_mb": 128}})
    assert (env._tools["python"].timeout_s, env._tools["python"].memory_mb) == (2.0, 128)
    with pytest.raises(ConfigError, match=r"tool_options names \['python'\], which are not tool names"):
        make_env("tools", task, tool_options={"python": {"timeout_s": 2.0}})
    with pytest.raises(ConfigError, match=r"tool_options\['python'\]=\{'timeout': 2\}.*unexpected keyword"):
        make_env("tools", task, tools=("python",), tool_options={"python": {"timeout": 2}})
