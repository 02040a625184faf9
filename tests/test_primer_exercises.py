"""Notebook 04b's two exercises, my_iou and my_nms: the shape every exercise keeps (a setup cell with
USE_SOLUTIONS = True, a stub that raises NotImplementedError, a collapsed solution cell tagged
"solution" that only runs while USE_SOLUTIONS is true, a check cell that grades the stub's function),
the solutions against the library on tiny inputs, and the check cells: they pass right answers and
fail the usual wrong ones. The exercise layout itself (stub, tagged and collapsed solution, check cell,
stub raising and the solution running only with USE_SOLUTIONS) is tested for 04b with every other
notebook, in tests/test_notebook_exercises.py.

Fast: the cells are read from the notebook JSON and run alone; the notebook itself runs under
``pytest --nbmake``.
"""
import json
import re

import numpy as np
import pytest
from test_notebook_exercises import NOTEBOOKS, SETUP_LINE, source
from test_notebook_exercises import cells as notebook_cells
from test_notebook_exercises import exercise_cells as notebook_exercise_cells

from minifpn.detection import box_iou, nms

NAME = "04b_detection_primer.ipynb"
NOTEBOOK = NOTEBOOKS / NAME


def _tiny_iou_case():
    a = np.array([[0.0, 0, 10, 10], [5, 5, 15, 15], [20, 20, 20, 20]])   # (A, 4), the last of zero area
    b = np.array([[0.0, 0, 10, 10], [10, 0, 20, 10]])                    # (B, 4)
    return a, b


def _tiny_nms_case():
    boxes = np.array([[0.0, 0, 10, 10], [1, 0, 11, 10], [30, 30, 40, 40], [31, 30, 41, 40]])
    return boxes, np.array([0.9, 0.8, 0.7, 0.7]), 0.5


# exercise function -> tiny arguments to call it with (the entries of EXERCISES for this notebook)
EXERCISES = {"my_iou": _tiny_iou_case, "my_nms": _tiny_nms_case}


def cells():
    return notebook_cells(NAME)


def exercise_cells():
    """{function name: (stub cell, solution cell, check cell)}, read as for every other notebook."""
    return notebook_exercise_cells(NAME)


def namespace(**extra):
    return {"np": np, "box_iou": box_iou, "nms": nms, "SEED": 0, **extra}


def solved(function):
    ns = namespace(USE_SOLUTIONS=True)
    exec(source(exercise_cells()[function][1]), ns)
    return ns[function]


def test_setup_cell_uses_the_solutions_and_says_how_to_grade_your_own():
    nb = cells()
    code = [c for c in nb if c["cell_type"] == "code"]
    setup = [i for i, c in enumerate(code) if "USE_SOLUTIONS =" in source(c)]
    assert setup == [0], f"USE_SOLUTIONS is assigned in code cells {setup}, expected the first alone"
    assert SETUP_LINE in source(code[0]).splitlines()
    before = nb[:nb.index(code[0])]
    assert any("USE_SOLUTIONS = False" in source(c) for c in before if c["cell_type"] == "markdown")


def test_notebook_is_stored_without_outputs_and_with_cell_ids():
    nb = json.loads(NOTEBOOK.read_text())
    assert (nb["nbformat"], nb["nbformat_minor"]) == (4, 5)
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(c["outputs"] == [] and c["execution_count"] is None for c in code)
    ids = [c["id"] for c in nb["cells"]]
    assert len(set(ids)) == len(ids) and all(re.fullmatch(r"[0-9a-f]{8}", i) for i in ids)


def test_iou_solution_gives_the_library_values():
    my_iou = solved("my_iou")
    a, b = _tiny_iou_case()
    got = my_iou(a, b)
    assert got.shape == (3, 2) and got.dtype == np.float64
    np.testing.assert_allclose(got, box_iou(a, b), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got, [[1.0, 0.0], [25 / 175, 25 / 175], [0.0, 0.0]], rtol=1e-12)  # by hand
    assert my_iou(np.zeros((0, 4)), b).shape == (0, 2)


def test_nms_solution_gives_the_library_values():
    my_nms = solved("my_nms")
    boxes, scores, threshold = _tiny_nms_case()
    got = my_nms(boxes, scores, threshold)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, nms(boxes, scores, threshold))
    np.testing.assert_array_equal(got, [0, 2])                        # by hand: 1 and 3 suppressed
    cases = [  # (boxes, scores, threshold, kept by hand)
        (np.array([[0.0, 0, 2, 1], [0, 0, 1, 1]]), np.array([0.9, 0.8]), 0.5, [0, 1]),   # IoU = 0.5: kept
        (np.array([[0.0, 0, 10, 10]] * 3), np.array([0.5, 0.9, 0.9]), 0.5, [1]),          # tie: lower index
        (np.array([[0.0, 0, 10, 10], [4, 0, 14, 10], [8, 0, 18, 10]]), np.array([0.9, 0.8, 0.7]), 0.3,
         [0, 2]),                                                      # a suppressed box suppresses nothing
        (np.array([[50.0, 50, 60, 60], [0, 0, 10, 10]]), np.array([0.1, 0.9]), 0.5, [1, 0]),  # best first
        (np.zeros((0, 4)), np.zeros(0), 0.5, []),
    ]
    for b, s, t, by_hand in cases:
        got = my_nms(b, s, t)
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, nms(b, s, t))
        np.testing.assert_array_equal(got, np.array(by_hand, dtype=np.int64))


# ---- the check cells: right answers pass, the usual wrong ones fail --------------------------------------

def _loop_iou(boxes_a, boxes_b):
    """IoU written as two loops: right, though not as the solution is written."""
    out = np.zeros((len(boxes_a), len(boxes_b)))
    for i, (ax1, ay1, ax2, ay2) in enumerate(boxes_a):
        for j, (bx1, by1, bx2, by2) in enumerate(boxes_b):
            inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
            union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
            out[i, j] = inter / union if union > 0 else 0.0
    return out


def _iou_parts(a, b, plus_one=0.0):
    a, b = a[:, None, :], b[None, :, :]
    w = np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]) + plus_one
    h = np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]) + plus_one
    area_a = (a[..., 2] - a[..., 0] + plus_one) * (a[..., 3] - a[..., 1] + plus_one)
    area_b = (b[..., 2] - b[..., 0] + plus_one) * (b[..., 3] - b[..., 1] + plus_one)
    return w, h, area_a, area_b


def _safe_divide(inter, union):
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def _wrong_ious():
    """{mistake: a my_iou that makes it}: each must fail the notebook's check cell."""
    def plus_one_pixel(a, b):                       # Pascal VOC's inclusive pixel count
        w, h, area_a, area_b = _iou_parts(a, b, plus_one=1.0)
        inter = np.clip(w, 0, None) * np.clip(h, 0, None)
        return _safe_divide(inter, area_a + area_b - inter)

    def union_without_subtracting(a, b):            # the overlap counted twice
        w, h, area_a, area_b = _iou_parts(a, b)
        inter = np.clip(w, 0, None) * np.clip(h, 0, None)
        return _safe_divide(inter, area_a + area_b)

    def intersection_not_clipped(a, b):             # apart in x and y: (-w) * (-h) > 0
        w, h, area_a, area_b = _iou_parts(a, b)
        return _safe_divide(w * h, area_a + area_b - w * h)

    def product_clipped_not_sides(a, b):            # max(w * h, 0): wrong when both sides are negative
        w, h, area_a, area_b = _iou_parts(a, b)
        inter = np.clip(w * h, 0, None)
        return _safe_divide(inter, area_a + area_b - inter)

    def transposed(a, b):                           # (B, A)
        return _loop_iou(b, a)

    def nan_on_zero_area(a, b):                     # 0 / 0
        w, h, area_a, area_b = _iou_parts(a, b)
        inter = np.clip(w, 0, None) * np.clip(h, 0, None)
        with np.errstate(invalid="ignore", divide="ignore"):
            return inter / (area_a + area_b - inter)

    def intersection_over_min_area(a, b):           # a different overlap measure
        w, h, area_a, area_b = _iou_parts(a, b)
        inter = np.clip(w, 0, None) * np.clip(h, 0, None)
        return _safe_divide(inter, np.minimum(area_a, area_b))

    def diagonal_only(a, b):                        # box i with box i, not every pair
        n = min(len(a), len(b))
        return np.diag(_loop_iou(a[:n], b[:n]))

    return {f.__name__: f for f in (plus_one_pixel, union_without_subtracting, intersection_not_clipped,
                                    product_clipped_not_sides, transposed, nan_on_zero_area,
                                    intersection_over_min_area, diagonal_only)}


def _greedy(boxes, scores, threshold, order, suppress):
    keep = []
    while len(order):
        best, rest = order[0], order[1:]
        keep.append(best)
        order = rest[~suppress(box_iou(boxes[best], boxes[rest])[0], threshold)] if len(rest) else rest
    return np.array(keep, dtype=np.int64)


def _while_loop_nms(boxes, scores, iou_threshold):
    """NMS as a while loop over the remaining order: right, though not as the solution is written."""
    return _greedy(boxes, scores, iou_threshold, np.argsort(-scores, kind="stable"), lambda iou, t: iou > t)


def _wrong_nmses():
    """{mistake: a my_nms that makes it}: each must fail the notebook's check cell."""
    def suppresses_at_the_threshold(boxes, scores, t):          # >= instead of >
        return _greedy(boxes, scores, t, np.argsort(-scores, kind="stable"), lambda iou, t: iou >= t)

    def reversed_ties(boxes, scores, t):                        # argsort(scores)[::-1]: higher index first
        return _greedy(boxes, scores, t, np.argsort(scores, kind="stable")[::-1], lambda iou, t: iou > t)

    def suppressed_boxes_suppress(boxes, scores, t):            # "fast NMS": any better box drops it
        order = np.argsort(-scores, kind="stable")
        iou = np.triu(box_iou(boxes[order], boxes[order]), k=1)  # (B, B): better row, worse column
        return order[~np.any(iou > t, axis=0)].astype(np.int64)

    def ties_never_suppress(boxes, scores, t):                  # dropped only by a strictly better box
        keep = [i for i in range(len(boxes))
                if not np.any((box_iou(boxes[i], boxes)[0] > t) & (scores > scores[i]))]
        return np.array(sorted(keep, key=lambda i: -scores[i]), dtype=np.int64)

    def no_sort(boxes, scores, t):                              # in index order, scores ignored
        return _greedy(boxes, scores, t, np.arange(len(boxes)), lambda iou, t: iou > t)

    def kept_in_index_order(boxes, scores, t):                  # right boxes, wrong order
        return np.sort(_while_loop_nms(boxes, scores, t))

    def only_the_best_suppresses(boxes, scores, t):             # one pass against the top box alone
        order = np.argsort(-scores, kind="stable")
        if not len(order):
            return np.zeros(0, dtype=np.int64)
        iou = box_iou(boxes[order[0]], boxes[order])[0]
        return np.concatenate([order[:1], order[1:][iou[1:] <= t]]).astype(np.int64)

    def boolean_mask(boxes, scores, t):                         # a keep mask, not indices
        mask = np.zeros(len(boxes), bool)
        mask[_while_loop_nms(boxes, scores, t)] = True
        return mask

    def plus_one_pixel_iou(boxes, scores, t):                   # NMS with the inclusive-pixel IoU
        iou_of = _wrong_ious()["plus_one_pixel"]
        order, keep = np.argsort(-scores, kind="stable"), []
        while len(order):
            keep.append(order[0])
            order = order[1:][iou_of(boxes[order[:1]], boxes[order[1:]])[0] <= t]
        return np.array(keep, dtype=np.int64)

    return {f.__name__: f for f in (suppresses_at_the_threshold, reversed_ties, suppressed_boxes_suppress,
                                    ties_never_suppress, no_sort, kept_in_index_order,
                                    only_the_best_suppresses, boolean_mask, plus_one_pixel_iou)}


RIGHT = {"my_iou": [_loop_iou, box_iou], "my_nms": [_while_loop_nms, nms]}
WRONG = {"my_iou": _wrong_ious(), "my_nms": _wrong_nmses()}


@pytest.mark.parametrize("function", sorted(EXERCISES))
def test_check_cell_passes_right_answers(function, capsys):
    check = exercise_cells()[function][2]
    for right in [solved(function), *RIGHT[function]]:
        exec(source(check), namespace(**{function: right}))
        assert "correct!" in capsys.readouterr().out, right


@pytest.mark.parametrize("function, mistake", [(f, m) for f in sorted(WRONG) for m in WRONG[f]])
def test_check_cell_fails_the_usual_wrong_answers(function, mistake, capsys):
    check = exercise_cells()[function][2]
    with pytest.raises(AssertionError):
        exec(source(check), namespace(**{function: WRONG[function][mistake]}))
    assert "correct!" not in capsys.readouterr().out, f"the check cell passed {mistake}"
