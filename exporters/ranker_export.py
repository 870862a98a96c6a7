"""Export the LightGBM ranker for Triton, parity-checked: a Treelite checkpoint (what the
FIL backend loads, ``model_type: treelite_checkpoint``), a tl2cgen-compiled library (what
the embedded Python-backend shim runs) and the feature assembly as ONNX.

Outputs in ``work/``: ``checkpoint.tl``, ``model.so``, ``rank_features.onnx`` and
``ranker_parity.json`` (parity numbers and 500-row prediction timings). Everything is built
in a staging folder first; when any parity check fails, :class:`RankerParityError` is
raised and none of the final files is written or replaced (and an older
``ranker_parity.json`` is removed: its presence means "a complete, checked set").

Both artifacts are compared with LightGBM's raw scores on real ranker rows (a sample saved
by ``exporters/ranker_train.py``) plus random rows with missing values. Rows are float32,
as Triton sends them (``input__0`` is TYPE_FP32).

**float32.** Production serves the checkpoint with Triton's FIL backend, which "exclusively
uses 32-bit precision. 64-bit model parameters are rounded to 32-bit values"
(fil_backend docs/model_config.md). LightGBM's thresholds and leaf values are float64, so
a checkpoint taken as it is would be scored by FIL with thresholds other than the ones the
gate checked, and a row whose value falls between a threshold and its rounding would take
another branch. So the export casts the checkpoint to float32 itself
(:func:`float32_model`) and ships only that: each threshold is rounded *toward the side
that keeps every float32 input on its branch* (down for ``<=``/``>``, up for ``<``/``>=``),
which is exact for float32 rows, the only rows Triton sends; leaf values are rounded to
nearest. FIL then has nothing left to round, and the embedded runtime's library is
compiled from the same checkpoint. The gate checks (1) the float64 conversion against
LightGBM at ``ExportParams.tolerance``; (2) that the float32 checkpoint sends every parity
row to the same leaf of every tree as the float64 one; (3) the float32 checkpoint and the
library against LightGBM within :func:`float32_tolerance`: the only differences left are
the rounding of each leaf value (at most u·|leaf|, u = 2^-24) and float32 summation over
the trees (at most (n-1)·u·Σ|leaf|, in any order), so the bound is
2·(n_trees+1)·u·Σ_t max|leaf_t| (twice the first-order bound, for the second-order terms),
or ``ExportParams.tolerance`` when that is larger.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np

from exporters import feature_assembly
from exporters.ranker_train import load_manifest, sample_rows_path
from recstack.errors import UserError
from recstack.settings import Settings, get_settings

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.tl"
LIBRARY = "model.so"
ASSEMBLY_ONNX = "rank_features.onnx"
PARITY = "ranker_parity.json"


@dataclass(frozen=True)
class ExportParams:
    """How the compiled library is built and checked."""

    # quantize=1 maps thresholds to integer bins: exact, and about twice as fast (DESIGN.md).
    quantize: int = 1
    parallel_comp: int = 2  # translation units compiled in parallel
    tolerance: float = 1e-5
    bench_rows: int = 500
    bench_repeats: int = 30
    # Also compile the other quantize variant to time it; both are parity-checked, and the
    # faster one single-threaded becomes model.so (quantize wins on many trees, loses on a
    # few: its per-feature bin lookups are a fixed cost per row).
    bench_other_variant: bool = True


class RankerParityError(RuntimeError):
    """An exported ranker artifact does not reproduce LightGBM's scores."""

    def __init__(self, artifact: Path, detail: str) -> None:
        super().__init__(f"{artifact}: ranker parity failed: {detail}")
        self.artifact = artifact


def _lightgbm_scores(booster: lgb.Booster, rows: np.ndarray) -> np.ndarray:
    return np.asarray(booster.predict(rows, raw_score=True, num_threads=1), dtype=np.float64)


def checkpoint_scores(checkpoint: Path, rows: np.ndarray) -> np.ndarray:
    """Raw scores of a Treelite checkpoint (treelite.gtil, the reference implementation)."""
    import treelite

    model = treelite.Model.deserialize(str(checkpoint))
    out = treelite.gtil.predict(model, np.ascontiguousarray(rows), pred_margin=True, nthread=1)
    return np.asarray(out, dtype=np.float64).reshape(len(rows), -1)[:, 0]


def library_scores(library: Path, rows: np.ndarray, nthread: int = 1) -> np.ndarray:
    """Raw scores of a tl2cgen-compiled library (float32 rows, as Triton sends them)."""
    import tl2cgen

    predictor = tl2cgen.Predictor(str(library), nthread=nthread)
    # tl2cgen 1.0.0 fails under NumPy 2 when DMatrix has to convert dtypes: pass float32.
    dmat = tl2cgen.DMatrix(np.ascontiguousarray(rows, dtype=np.float32), dtype="float32")
    out = predictor.predict(dmat, pred_margin=True)
    return np.asarray(out, dtype=np.float64).reshape(len(rows), -1)[:, 0]


# Scores a library in a child process: a corrupt shared object can crash the process that
# loads it (SIGBUS), and dlopen would hand back a stale copy of a path loaded before.
_SCORE_CHILD = """
import sys, numpy as np, tl2cgen
lib, rows, out = sys.argv[1:4]
x = np.load(rows)
p = tl2cgen.Predictor(lib, nthread=1)
s = p.predict(tl2cgen.DMatrix(x, dtype="float32"), pred_margin=True)
np.save(out, np.asarray(s, dtype=np.float64).reshape(len(x), -1)[:, 0])
"""


def library_scores_isolated(library: Path, rows: np.ndarray) -> np.ndarray:
    """:func:`library_scores` in a fresh Python process (see ``_SCORE_CHILD``)."""
    with tempfile.TemporaryDirectory() as tmp:
        rows_path, out_path = Path(tmp) / "rows.npy", Path(tmp) / "scores.npy"
        np.save(rows_path, np.ascontiguousarray(rows, dtype=np.float32))
        proc = subprocess.run(
            [sys.executable, "-c", _SCORE_CHILD, str(library), str(rows_path), str(out_path)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
            raise RuntimeError(f"scoring process failed ({proc.returncode}): {tail}")
        return np.load(out_path)


def check_ranker_parity(
    booster: lgb.Booster,
    rows: np.ndarray,
    *,
    checkpoint: Path | None = None,
    library: Path | None = None,
    tolerance: float = 1e-5,
) -> dict[str, Any]:
    """Compare the checkpoint and/or the compiled library with ``booster``'s raw scores on
    ``rows`` (float32 [n, F]). Returns ``{"checkpoint": {...}, "library": {...}}`` with the
    max abs diff of each; raises :class:`RankerParityError` if an artifact cannot be loaded,
    has the wrong number of features, or differs by ``tolerance`` or more."""
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    want = _lightgbm_scores(booster, rows)
    record: dict[str, Any] = {"rows": len(rows), "tolerance": tolerance}
    checks = [
        ("checkpoint", checkpoint, checkpoint_scores),
        ("library", library, library_scores_isolated),
    ]
    for name, path, scorer in checks:
        if path is None:
            continue
        try:
            got = scorer(Path(path), rows)
        except Exception as e:  # any load/predict failure is a parity failure of that file
            raise RankerParityError(Path(path), f"cannot score rows: {e}") from e
        if got.shape != want.shape:
            raise RankerParityError(Path(path), f"{got.shape} scores for {want.shape} rows")
        diff = float(np.max(np.abs(got - want))) if len(rows) else 0.0
        if not diff < tolerance:  # NaN fails too
            raise RankerParityError(Path(path), f"max abs diff {diff:.3g} >= {tolerance:g}")
        record[name] = {"max_abs_diff": diff, "path": Path(path).name}
    return record


def _round_threshold(threshold: float, op: str) -> float:
    """The float32 threshold that decides every float32 input as ``threshold`` does in
    float64: for ``x <= t`` (and ``x > t``) the largest float32 <= t, since no float32 lies
    in (that, t]; for ``x < t`` (and ``x >= t``) the smallest float32 >= t."""
    f = np.float32(threshold)
    if op in ("<=", ">") and float(f) > threshold:
        f = np.nextafter(f, np.float32(-np.inf))
    elif op in ("<", ">=") and float(f) < threshold:
        f = np.nextafter(f, np.float32(np.inf))
    return float(f)


# Treelite 4 enums (include/treelite/enum/*.h): TaskType, Operator, TreeNodeType.
_TASK_TYPES = {0: "kBinaryClf", 1: "kRegressor", 2: "kMultiClf", 3: "kLearningToRank",
               4: "kIsolationForest"}  # fmt: skip
_OPERATORS = {2: "<", 3: "<=", 4: ">", 5: ">="}
_LEAF, _NUMERICAL, _CATEGORICAL = 0, 1, 2


def float32_model(model: Any) -> Any:
    """``model`` (a Treelite model, e.g. float64 from LightGBM) rebuilt with float32
    thresholds and leaf values (see the module doc for the rounding). Every node keeps its
    id, so ``treelite.gtil.predict_leaf`` of both models can be compared. Read through the
    field accessors: the JSON dump writes an infinite threshold (LightGBM's 1e300) as
    nothing."""
    from treelite import model_builder as mb

    if (model.input_type, model.output_type) == ("float32", "float32"):
        return model
    head = model.get_header_accessor()

    def ints(name: str) -> list[int]:
        return [int(v) for v in head.get_field(name)]

    if ints("leaf_vector_shape") != [1, 1]:
        raise UserError("float32_model handles one output per leaf (a ranker/regressor)")
    builder = mb.ModelBuilder(
        threshold_type="float32",
        leaf_output_type="float32",
        metadata=mb.Metadata(
            num_feature=ints("num_feature")[0],
            task_type=_TASK_TYPES[ints("task_type")[0]],
            average_tree_output=bool(ints("average_tree_output")[0]),
            num_target=ints("num_target")[0],
            num_class=ints("num_class"),
            leaf_vector_shape=(1, 1),
        ),
        tree_annotation=mb.TreeAnnotation(
            num_tree=model.num_tree, target_id=ints("target_id"), class_id=ints("class_id")
        ),
        postprocessor=mb.PostProcessorFunc(
            str(head.get_field("postprocessor")),
            sigmoid_alpha=float(head.get_field("sigmoid_alpha")[0]),
            ratio_c=float(head.get_field("ratio_c")[0]),
        ),
        base_scores=[float(v) for v in head.get_field("base_scores")],
        attributes=json.loads(str(head.get_field("attributes")) or "{}"),
    )
    for i in range(model.num_tree):
        tree = model.get_tree_accessor(i)
        f = {name: tree.get_field(name) for name in (
            "node_type", "cleft", "cright", "split_index", "default_left", "leaf_value",
            "threshold", "cmp", "category_list", "category_list_begin", "category_list_end",
            "category_list_right_child",
        )}  # fmt: skip
        builder.start_tree()
        for node in range(int(tree.get_field("num_nodes")[0])):
            builder.start_node(node)
            kind = int(f["node_type"][node])
            children = {
                "left_child_key": int(f["cleft"][node]),
                "right_child_key": int(f["cright"][node]),
            }
            if kind == _LEAF:
                builder.leaf(float(np.float32(f["leaf_value"][node])))
            elif kind == _NUMERICAL:
                op = _OPERATORS[int(f["cmp"][node])]
                builder.numerical_test(
                    int(f["split_index"][node]),
                    _round_threshold(float(f["threshold"][node]), op),
                    default_left=bool(f["default_left"][node]),
                    opname=op,
                    **children,
                )
            elif kind == _CATEGORICAL:  # no floating-point parameter to round
                begin, end = f["category_list_begin"][node], f["category_list_end"][node]
                builder.categorical_test(
                    int(f["split_index"][node]),
                    default_left=bool(f["default_left"][node]),
                    category_list=[int(c) for c in f["category_list"][begin:end]],
                    category_list_right_child=bool(f["category_list_right_child"][node]),
                    **children,
                )
            else:
                raise UserError(f"tree {i} node {node}: unknown Treelite node type {kind}")
            builder.end_node()
        builder.end_tree()
    return builder.commit()


def float32_tolerance(model: Any, floor: float = 0.0) -> float:
    """Largest |float32 score - float64 score| a float32 evaluation of ``model`` can show
    when every row takes the same branches (module doc): 2·(n+1)·2^-24·Σ_t max|leaf_t|."""
    total = 0.0
    for i in range(model.num_tree):
        tree = model.get_tree_accessor(i)
        leaves = tree.get_field("leaf_value")[tree.get_field("node_type") == _LEAF]
        total += float(np.max(np.abs(leaves), initial=0.0))
    bound = 2.0 * (model.num_tree + 1) * 2.0**-24 * total
    return max(bound, floor)


def check_same_leaves(reference: Any, candidate: Any, rows: np.ndarray, name: Path) -> int:
    """Every row reaches the same leaf of every tree in both models (treelite.gtil);
    raises :class:`RankerParityError` naming the first row and tree that differ."""
    import treelite

    rows = np.ascontiguousarray(rows, dtype=np.float32)
    want = treelite.gtil.predict_leaf(reference, rows, nthread=1)
    got = treelite.gtil.predict_leaf(candidate, rows, nthread=1)
    if got.shape != want.shape:
        raise RankerParityError(name, f"leaf matrix {got.shape}, expected {want.shape}")
    diff = np.argwhere(got != want)
    if len(diff):
        row, tree = diff[0]
        raise RankerParityError(
            name,
            f"{len(diff)} (row, tree) decisions differ from the float64 model, first row "
            f"{row} tree {tree}",
        )
    return int(want.size)


def parity_rows(sample: np.ndarray, n_random: int = 256, seed: int = 0) -> np.ndarray:
    """Real rows plus random rows drawn per column from the real values, with ~5% missing
    (NaN), so default (missing-value) branches are exercised too."""
    rng = np.random.default_rng(seed)
    if len(sample) == 0:
        return sample.astype(np.float32)
    idx = rng.integers(0, len(sample), size=(n_random, sample.shape[1]))
    synth = sample[idx, np.arange(sample.shape[1])]
    synth[rng.random(synth.shape) < 0.05] = np.nan
    return np.concatenate([sample, synth]).astype(np.float32)


# tl2cgen 1.0.0 bundles Treelite 4.1.2 and reads the checkpoint bytes of the installed
# treelite (4.8.1, the version pinned for FIL, docs/triton.md). Its bundled Treelite then
# writes to stderr, on every compile: "The model you are loading originated from a newer
# Treelite version; some functionalities may be unavailable" plus both version numbers.
# Harmless here: Treelite keeps its serialization compatible within major version 4,
# recstack's ranker uses none of the newer features (numerical splits, one float32 leaf
# value), and every compiled library is checked against LightGBM right after
# (check_ranker_parity), so a misread model fails the export. The C++ code writes to the
# stderr file descriptor directly, so no Python warning filter reaches it: the compile's
# stderr is captured and written back without exactly that notice.
TREELITE_NEWER_NOTICE = re.compile(
    r"^\[[^\]\n]*\] [^\n]*: The model you are loading originated from a newer Treelite "
    r"version; some functionalities may be unavailable\.\n"
    r"Currently running Treelite version [\d.]+\n"
    r"The model checkpoint was generated from Treelite version [\d.]+\n",
    re.MULTILINE,
)


@contextlib.contextmanager
def _without_treelite_version_notice() -> Iterator[None]:
    """Capture the stderr file descriptor for the block, then write back what was written
    to it less TREELITE_NEWER_NOTICE (logged at debug)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            text = captured.read().decode("utf-8", "replace")
            kept, dropped = TREELITE_NEWER_NOTICE.subn("", text)
            if dropped:
                log.debug("tl2cgen's Treelite version notice dropped (see TREELITE_NEWER_NOTICE)")
            if kept:
                sys.stderr.write(kept)
                sys.stderr.flush()


def compile_library(model: Any, libpath: Path, params: ExportParams, quantize: int) -> float:
    """tl2cgen-compile a Treelite model to ``libpath``; returns the seconds it took."""
    import tl2cgen

    t0 = time.perf_counter()
    with _without_treelite_version_notice():
        tl2cgen.export_lib(
            model,
            toolchain="gcc",
            libpath=str(libpath),
            params={"parallel_comp": params.parallel_comp, "quantize": quantize},
            nthread=params.parallel_comp,
        )
    return time.perf_counter() - t0


def _median_ms(fn: Any, repeats: int) -> float:
    fn()  # warm-up: page in the library, allocate
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _timing_key(quantize: int, nthread: int) -> str:
    return f"tl2cgen{'_quantized' if quantize else ''}_{nthread}thread_ms"


def time_predictions(
    booster: lgb.Booster, libraries: dict[int, Path], rows: np.ndarray, repeats: int
) -> dict[str, float]:
    """Median ms to score ``rows`` with LightGBM (1 thread) and each library (1, 2 threads).
    A shared, noisy machine: compare these as ratios within one run."""
    import tl2cgen
    from tl2cgen.exception import TL2cgenError

    rows = np.ascontiguousarray(rows, dtype=np.float32)
    out = {"lightgbm_1thread_ms": _median_ms(lambda: _lightgbm_scores(booster, rows), repeats)}
    for quantize, lib in sorted(libraries.items()):
        for nthread in (1, 2):
            label = _timing_key(quantize, nthread)
            try:
                predictor = tl2cgen.Predictor(str(lib), nthread=nthread)
            except TL2cgenError as e:
                # OpenMP caps this process at one thread (e.g. FAISS set it for serving
                # search): a timing we cannot take, not a broken artifact.
                log.warning("no %d-thread timing: %s", nthread, e)
                continue

            def run(p: Any = predictor) -> None:
                p.predict(tl2cgen.DMatrix(rows, dtype="float32"), pred_margin=True)

            out[label] = _median_ms(run, repeats)
    return out


def export(settings: Settings, params: ExportParams | None = None) -> None:
    """Write ``checkpoint.tl``, ``model.so``, ``rank_features.onnx`` and
    ``ranker_parity.json`` into ``work/`` from ``work/ranker.txt`` (see module doc)."""
    import treelite

    params = params or ExportParams()
    work = settings.work_dir
    model_txt = work / "ranker.txt"
    if not model_txt.exists():
        raise UserError(f"{model_txt} not found: run the ranker step first")
    manifest = load_manifest(settings)
    layout = feature_assembly.Layout.from_json(manifest["layout"])
    booster = lgb.Booster(model_file=str(model_txt))
    if booster.num_feature() != layout.n_features:
        raise UserError(
            f"{model_txt}: {booster.num_feature()} features, layout has {layout.n_features}"
        )
    sample = np.load(sample_rows_path(settings))
    rows = parity_rows(sample)

    # The parity record marks a complete, checked set: drop the old one first, so a failed
    # export never leaves an older set that looks current beside a newer ranker.txt.
    (work / PARITY).unlink(missing_ok=True)
    stage = work / ".ranker_export.tmp"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    try:
        onnx_record = feature_assembly.export_onnx(
            stage / ASSEMBLY_ONNX, layout, settings.model_repository, tolerance=params.tolerance
        )
        # (1) the conversion itself, at full precision
        model64 = treelite.frontend.from_lightgbm(booster)
        model64.serialize(str(stage / "checkpoint64.tl"))
        parity64 = check_ranker_parity(
            booster, rows, checkpoint=stage / "checkpoint64.tl", tolerance=params.tolerance
        )
        # (2) the float32 checkpoint FIL will serve takes the same branches
        model = float32_model(model64)
        model.serialize(str(stage / CHECKPOINT))
        decisions = check_same_leaves(model64, model, rows, stage / CHECKPOINT)
        # (3) its scores and the library's, within the float32 bound
        tolerance = float32_tolerance(model, floor=params.tolerance)
        log.info("compiling %d trees with tl2cgen (quantize=%d)", model.num_tree, params.quantize)
        compile_s = compile_library(model, stage / LIBRARY, params, params.quantize)
        parity = check_ranker_parity(
            booster,
            rows,
            checkpoint=stage / CHECKPOINT,
            library=stage / LIBRARY,
            tolerance=tolerance,
        )
        parity["float64_checkpoint"] = parity64["checkpoint"] | {"tolerance": params.tolerance}
        parity["float32"] = {
            "thresholds": "rounded toward the branch each float32 input takes in float64",
            "same_leaf_decisions": decisions,
            "tolerance": tolerance,
            "tolerance_rule": "2*(n_trees+1)*2^-24*sum_t max|leaf_t|",
        }
        libraries = {params.quantize: stage / LIBRARY}
        if params.bench_other_variant:
            other = 1 - params.quantize
            other_lib = stage / f"bench_quantize{other}.so"
            compile_library(model, other_lib, params, other)
            # Timed only, but check it too: a fast wrong library is no option.
            check_ranker_parity(booster, rows, library=other_lib, tolerance=tolerance)
            libraries[other] = other_lib
        bench = np.resize(sample, (params.bench_rows, sample.shape[1])).astype(np.float32)
        timings = time_predictions(booster, libraries, bench, params.bench_repeats)
        chosen = min(libraries, key=lambda q: timings[_timing_key(q, 1)])
        if libraries[chosen] != stage / LIBRARY:
            libraries[chosen].replace(stage / LIBRARY)
        record = {
            "ranker": parity,
            "rank_features_onnx": onnx_record,
            "num_trees": model.num_tree,
            "num_features": model.num_feature,
            "compile_seconds": round(compile_s, 2),
            "library_quantize": chosen,
            "export_params": asdict(params),
            "timing_rows": params.bench_rows,
            "timings_ms": {k: round(v, 4) for k, v in timings.items()},
            "treelite_version": treelite.__version__,
        }
        (stage / PARITY).write_text(json.dumps(record, indent=2))
        # All checks passed: move the finished files into place (parity record last, so its
        # presence means the set is complete).
        for name in (ASSEMBLY_ONNX, CHECKPOINT, LIBRARY, PARITY):
            (stage / name).replace(work / name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    log.info(
        "ranker export: checkpoint diff %.3g, library diff %.3g, model.so quantize=%d, "
        "500 rows: %s",
        parity["checkpoint"]["max_abs_diff"],
        parity["library"]["max_abs_diff"],
        chosen,
        record["timings_ms"],
    )


def cli(args: argparse.Namespace) -> int:
    """``recstack train --only ranker_export`` runs this through the pipeline; kept for
    direct use."""
    export(get_settings())
    return 0
