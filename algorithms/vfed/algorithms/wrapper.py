"""The entry point of every algorithm image: input file in, one declared function called, output file out.

Exit codes: 0 the output holds the result; 1 the algorithm raised (the output holds a structured error, the
traceback is in the run log); 2 the run could not start (bad input, unknown method, missing dataset);
3 disclosure control refused (too few records, a small count, a saturated model: the node's limits from
VFED_MIN_ROWS, VFED_MIN_CELL_COUNT, VFED_MAX_GLM_SATURATION, checked on the structured result as the node
will). Every failure writes an error output when OUTPUT_FILE is set.

The exit codes are the node's contract (vfed.common.api.reasons): it reports them to the initiator as
`algorithm-error: <exception type>`, `bad-input` and `disclosure-refused`. The error output and everything
printed here (message, traceback) stay on the node: the output of a failed run is not released, and the log
leaves the node sealed to its organization.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from vfed.algorithms.client import AlgorithmClient
from vfed.algorithms.datasets import load_dataset
from vfed.algorithms.decorators import declared_functions, load_module, manifest_of
from vfed.algorithms.disclosure import DisclosureError, require_disclosable, require_min_rows
from vfed.algorithms.disclosure import limits as disclosure_limits
from vfed.common.api.reasons import EXIT_ALGORITHM_ERROR, EXIT_DISCLOSURE, EXIT_OK, EXIT_SETUP_ERROR
from vfed.common.manifest import FunctionKind, FunctionSpec, declared_epsilon
from vfed.common.payload import TaskInput, encode_error, encode_result

MODULE_ENV = "VFED_ALGORITHM_MODULE"
EPSILON_GRANTED_ENV = "VFED_EPSILON_GRANTED"

log = logging.getLogger("vfed.algorithms")


class SetupError(Exception):
    """The run cannot start: the input, the image or the node's environment is wrong."""


def _read_input(env: Mapping[str, str]) -> TaskInput:
    path = env.get("INPUT_FILE")
    if not path:
        raise SetupError("INPUT_FILE is not set")
    try:
        return TaskInput.from_json(Path(path).read_bytes())
    except OSError as exc:
        raise SetupError(f"cannot read INPUT_FILE {path}: {exc.strerror or exc}") from exc
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "input"
        raise SetupError(f"INPUT_FILE is not a valid task input: {where}: {first['msg']}") from exc


def _resolve(
    env: Mapping[str, str], method: str
) -> tuple[Callable[..., Any], FunctionSpec, dict[str, FunctionSpec]]:
    module_name = env.get(MODULE_ENV)
    if not module_name:
        raise SetupError(f"{MODULE_ENV} is not set: the image must name its algorithm module")
    try:
        module = load_module(module_name)
    except ImportError as exc:
        raise SetupError(f"cannot import algorithm module {module_name!r}: {exc}") from exc
    functions = declared_functions(module)
    if method not in functions:
        offered = ", ".join(sorted(functions)) or "none"
        raise SetupError(
            f"method {method!r} is not a declared function of {module_name} (declared: {offered})"
        )
    function, spec = functions[method]
    return function, spec, {name: entry[1] for name, entry in functions.items()}


def _check_epsilon(spec: FunctionSpec, task_input: TaskInput, env: Mapping[str, str]) -> None:
    """The epsilon argument must be valid and, when the node says what it charged, within that grant."""
    epsilon = declared_epsilon(spec, task_input)
    granted = env.get(EPSILON_GRANTED_ENV)
    if epsilon is None or not granted:
        return
    if epsilon > float(granted) * (1 + 1e-12):
        raise SetupError(f"epsilon {epsilon:g} exceeds the {granted} the node granted this run")


def _prepare(task_input: TaskInput, env: Mapping[str, str]) -> Callable[[], Any]:
    """Everything that can fail before the algorithm's own code runs; returns the call to make (for a
    function that reads datasets, one whose structured result is checked as the node will check it)."""
    function, spec, declared = _resolve(env, task_input.method)
    _check_epsilon(spec, task_input, env)
    if spec.kind is FunctionKind.CENTRAL:
        client = AlgorithmClient.from_env(env, declared)
        return lambda: function(client, *task_input.args, **task_input.kwargs)
    frames = [load_dataset(label, env) for label in spec.datasets]
    limit = disclosure_limits(env)
    for label, frame in zip(spec.datasets, frames, strict=True):
        require_min_rows(frame, f"dataset {label!r}", limit.min_rows)

    def call() -> Any:
        value = function(*frames, *task_input.args, **task_input.kwargs)
        if spec.datasets:
            require_disclosable(value, limit)
        return value

    return call


def _fail(output: str | None, exc: Exception, code: int, trace: str = "") -> int:
    if trace:
        print(trace, file=sys.stderr, end="")
    else:
        print(f"vfed: {type(exc).__name__}: {exc}", file=sys.stderr)
    if output:
        rule = exc.rule if isinstance(exc, DisclosureError) else None
        Path(output).write_bytes(encode_error(type(exc).__name__, str(exc), trace, rule))
    return code


def run(env: Mapping[str, str]) -> int:
    """One run of the algorithm, as the node started it; returns the process exit code."""
    output = env.get("OUTPUT_FILE")
    try:
        task_input = _read_input(env)
        call = _prepare(task_input, env)
    except DisclosureError as exc:
        return _fail(output, exc, EXIT_DISCLOSURE)
    except Exception as exc:  # every way a run can fail to start ends in the same kind of error output
        return _fail(output, exc, EXIT_SETUP_ERROR)
    log.info("running %s", task_input.method)
    try:
        data = encode_result(call())
    except DisclosureError as exc:
        return _fail(output, exc, EXIT_DISCLOSURE)
    except Exception as exc:
        return _fail(output, exc, EXIT_ALGORITHM_ERROR, traceback.format_exc())
    if output:
        Path(output).write_bytes(data)
    log.info("%s finished: %d bytes of output", task_input.method, len(data))
    return EXIT_OK


def _print_manifest(module_name: str | None) -> int:
    if not module_name:
        print(f"vfed: no module: pass --module or set {MODULE_ENV}", file=sys.stderr)
        return EXIT_SETUP_ERROR
    try:
        module = load_module(module_name)
    except ImportError as exc:
        print(f"vfed: cannot import algorithm module {module_name!r}: {exc}", file=sys.stderr)
        return EXIT_SETUP_ERROR
    print(manifest_of(module).model_dump_json())
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m vfed.algorithms` (a run) or `python -m vfed.algorithms --manifest` (the declarations)."""
    parser = argparse.ArgumentParser(prog="python -m vfed.algorithms", description=__doc__)
    parser.add_argument("--manifest", action="store_true", help="print the module's manifest as JSON")
    parser.add_argument("--module", help=f"algorithm module (default: ${MODULE_ENV})")
    options = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    if options.manifest:
        return _print_manifest(options.module or os.environ.get(MODULE_ENV))
    env = dict(os.environ)
    if options.module:
        env[MODULE_ENV] = options.module
    return run(env)
