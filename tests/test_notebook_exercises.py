"""The notebooks' exercises keep their shape: a setup cell with USE_SOLUTIONS = True, then for every
"Your turn" a stub that raises NotImplementedError, a collapsed solution cell tagged "solution" that
only runs while USE_SOLUTIONS is true, and a check cell that grades the stub's function.

Fast: the cells are read from the notebook JSON and run alone on tiny inputs; the notebooks themselves
run (with the solutions in place, so every check cell is exercised) under ``pytest --nbmake``.
"""
import json
import re
from pathlib import Path

import numpy as np
import pytest

import minifpn.functional as F
from minifpn.detection import box_iou, match_anchors
from minifpn.models import FPN

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
SETUP_LINE = "USE_SOLUTIONS = True  # False: grade your own code below"
SOLUTION_FIRST_LINE = "if USE_SOLUTIONS:  # the solution; run with False to grade yours"


def _tiny_anchor_case():
    anchors = np.array([[0, 0, 8, 8], [4, 4, 12, 12], [20, 20, 28, 28]], dtype=np.float64)   # (A, 4)
    boxes = np.array([[1, 1, 9, 9]], dtype=np.float64)                                       # (G, 4)
    return anchors, boxes, 0.7, 0.3


def _tiny_pyramid_case():
    # C2..C5 of a 20x20 image (5, 3, 2, 1: ceil halving, so 3 -> 5 is not 2x), an FPN with d = 2
    rng = np.random.default_rng(0)
    sizes = zip([2, 3, 4, 5], [5, 3, 2, 1])
    features = [rng.standard_normal((1, c, s, s)).astype(np.float32) for c, s in sizes]
    fpn = FPN([2, 3, 4, 5], 2, seed=0)
    return fpn, features, fpn(features)[:4]  # the library's P2..P5


def _tiny_p3_case():
    # the FPN of _tiny_pyramid_case (P3 3x3, M4 2x2, M5 1x1: 3 -> 2 is not 2x), C2..C5 shapes, C2..C5
    fpn, features, _ = _tiny_pyramid_case()
    return fpn, [c.shape for c in features], features


def _library_p3_gradient(fpn, features, channel, y, x):
    """The FPN's own [dC2, dC3, dC4, dC5] for dL/dP3 one-hot at (image 0, channel, y, x), no other
    gradient; the trace records which maps it reached."""
    fpn.trace = True
    p3 = fpn(features)[1]
    d_p3 = np.zeros_like(p3)
    d_p3[0, channel, y, x] = 1.0
    grads = fpn.backward([None, d_p3, None, None, None])
    assert "C2" not in fpn.grads and {"M3", "M4", "M5", "C3", "C4", "C5"} <= set(fpn.grads)
    return grads


def _tiny_frozen_bn_case():
    # x (1, 2, 2, 3): C = 2 channels on maps 3 wide (a scale broadcast along W fails), and the four
    # (C,) arrays weight, bias, running_mean, running_var; channel 1's variance is far below eps
    x = np.arange(12.0).reshape(1, 2, 2, 3)
    return x, np.array([1.0, 2.0]), np.array([0.5, -1.0]), np.array([3.0, 8.0]), np.array([4.0, 1e-7])


# notebook -> {exercise function: tiny arguments to call it with}
EXERCISES = {
    "01_convolution_and_im2col.ipynb": {
        "my_im2col": lambda: (np.arange(16.0).reshape(1, 1, 4, 4), 3, 1, 0),
        "my_col2im": lambda: (np.ones((1, 3, 3, 1, 2, 2)), (1, 1, 4, 4), 1, 0),
    },
    "04b_detection_primer.ipynb": {
        "my_iou": lambda: (np.array([[0.0, 0, 10, 10], [5, 5, 15, 15]]), np.array([[0.0, 0, 10, 10]])),
        "my_nms": lambda: (np.array([[0.0, 0, 10, 10], [1, 0, 11, 10], [30, 30, 40, 40]]),
                           np.array([0.9, 0.8, 0.7]), 0.5),
    },
    "02_backprop_and_gradient_checks.ipynb": {
        "my_max_pool2d_backward": lambda: (np.ones((1, 1, 2, 2)), np.arange(16.0).reshape(1, 1, 4, 4), 2, 2),
        "my_upsample_nearest_backward": lambda: (np.ones((1, 1, 4, 4)), (2, 2)),
    },
    "04_top_down_pathway.ipynb": {
        "my_top_down": lambda: _tiny_pyramid_case()[:2],
    },
    "05_anchors_and_matching.ipynb": {
        "my_match_anchors": _tiny_anchor_case,
    },
    "09_roialign_and_two_stage.ipynb": {
        "my_p3_gradient": lambda: _tiny_p3_case()[:2] + (1, 1, 2),
    },
    "10_pretraining_and_freezing.ipynb": {
        "my_frozen_batch_norm": _tiny_frozen_bn_case,
    },
}


def cells(name):
    return json.loads((NOTEBOOKS / name).read_text())["cells"]


def source(cell):
    return "".join(cell["source"])


def exercise_cells(name):
    """{function name: (stub cell, solution cell, check cell)} for every "### Your turn" of a notebook."""
    found = {}
    nb = cells(name)
    for i, cell in enumerate(nb):
        if cell["cell_type"] != "markdown" or not source(cell).lstrip().startswith("### Your turn:"):
            continue
        stub, solution, check = nb[i + 1:i + 4]
        match = re.search(r"^def (my_\w+)\(", source(stub), flags=re.MULTILINE)
        assert match, f"{name}: the cell after '{source(cell).splitlines()[0]}' defines no my_<name>"
        found[match[1]] = (stub, solution, check)
    return found


def namespace(**extra):
    return {"np": np, "F": F, "box_iou": box_iou, **extra}


@pytest.mark.parametrize("name", sorted(EXERCISES))
def test_setup_cell_uses_the_solutions_and_says_how_to_grade_your_own(name):
    nb = cells(name)
    code = [c for c in nb if c["cell_type"] == "code"]
    setup = [i for i, c in enumerate(code) if "USE_SOLUTIONS =" in source(c)]
    assert setup and setup[0] < 3, f"{name}: no USE_SOLUTIONS assignment in the first code cells"
    assert SETUP_LINE in source(code[setup[0]]).splitlines(), \
        f"{name}: setup cell does not read {SETUP_LINE!r}"
    assert len(setup) == 1, f"{name}: USE_SOLUTIONS is assigned in {len(setup)} code cells"
    before = nb[:nb.index(code[setup[0]])]
    assert any("USE_SOLUTIONS = False" in source(c) for c in before if c["cell_type"] == "markdown"), \
        f"{name}: no markdown before the setup cell tells the learner to set USE_SOLUTIONS = False"


@pytest.mark.parametrize("name", sorted(EXERCISES))
def test_every_your_turn_has_a_stub_a_hidden_solution_and_a_check(name):
    found = exercise_cells(name)
    assert sorted(found) == sorted(EXERCISES[name]), f"{name}: exercises {sorted(found)}"
    for function, (stub, solution, check) in found.items():
        assert stub["cell_type"] == solution["cell_type"] == check["cell_type"] == "code"
        assert "# YOUR CODE HERE" in source(stub) and "raise NotImplementedError" in source(stub), function
        assert "solution" in solution["metadata"].get("tags", []), f"{function}: solution cell not tagged"
        assert solution["metadata"].get("jupyter", {}).get("source_hidden") is True, \
            f"{function}: solution cell is not collapsed"
        assert source(solution).splitlines()[0] == SOLUTION_FIRST_LINE, f"{function}: solution's first line"
        assert re.search(rf"^    def {function}\(", source(solution), flags=re.MULTILINE), \
            f"{function}: the solution does not redefine {function} inside its if"
        assert f"{function}(" in source(check) and "correct!" in source(check), \
            f"{function}: the check cell neither calls it nor prints 'correct!'"
        assert "assert" in source(check), f"{function}: the check cell asserts nothing"


@pytest.mark.parametrize("name, function", [(n, f) for n in sorted(EXERCISES) for f in EXERCISES[n]])
def test_stub_raises_and_solution_runs_only_with_use_solutions(name, function):
    stub, solution, _ = exercise_cells(name)[function]
    args = EXERCISES[name][function]()
    learner = namespace()
    exec(source(stub), learner)
    with pytest.raises(NotImplementedError, match="your turn"):
        learner[function](*args)
    # with USE_SOLUTIONS = False the solution cell leaves the learner's stub in place ...
    exec(source(solution), namespace(USE_SOLUTIONS=False, **{function: learner[function]}))
    with pytest.raises(NotImplementedError, match="your turn"):
        learner[function](*args)
    # ... and with True it defines a function that runs on the same tiny inputs
    solved = namespace(USE_SOLUTIONS=True, **{function: learner[function]})
    exec(source(solution), solved)
    assert solved[function] is not learner[function]
    solved[function](*args)


def test_tiny_solutions_give_the_library_values():
    # the solutions on the tiny inputs above, against the library: a check that can fail
    solved = namespace(USE_SOLUTIONS=True)
    for name in EXERCISES:
        for _, solution, _ in exercise_cells(name).values():
            exec(source(solution), solved)
    x = np.arange(16.0).reshape(1, 1, 4, 4)
    np.testing.assert_array_equal(solved["my_im2col"](x, 3, 1, 0), F.im2col(x, 3, 1, 0))
    col = np.arange(36.0).reshape(1, 3, 3, 1, 2, 2)
    np.testing.assert_array_equal(solved["my_col2im"](col, (1, 1, 4, 4), 1, 0),
                                  F.col2im(col, (1, 1, 4, 4), 1, 0))
    out, cache = F.max_pool2d(x, 2, 2)
    dout = np.array([[[[1.0, 2.0], [3.0, 4.0]]]])
    np.testing.assert_array_equal(solved["my_max_pool2d_backward"](dout, x, 2, 2),
                                  F.max_pool2d_backward(dout, cache))
    out, cache = F.upsample_nearest(x[:, :, :2, :2], (4, 4))
    np.testing.assert_array_equal(solved["my_upsample_nearest_backward"](x, (2, 2)),
                                  F.upsample_nearest_backward(x, cache))
    anchors, boxes, pos, neg = _tiny_anchor_case()
    expected = match_anchors(anchors, boxes, pos, neg)
    for got, want in zip(solved["my_match_anchors"](anchors, boxes, pos, neg), expected):
        np.testing.assert_array_equal(got, want)


def test_p3_gradient_solution_gives_the_library_values():
    solved = namespace(USE_SOLUTIONS=True)
    exec(source(exercise_cells("09_roialign_and_two_stage.ipynb")["my_p3_gradient"][1]), solved)
    fpn, shapes, features = _tiny_p3_case()
    for channel in range(2):
        for y in range(3):
            for x in range(3):  # every cell of the 3x3 P3: the border's padding, and 3 -> 2 unequal runs
                got = solved["my_p3_gradient"](fpn, shapes, channel, y, x)
                want = _library_p3_gradient(fpn, features, channel, y, x)
                assert want[0] is None and (got[0] is None or not np.any(got[0]))
                for mine, theirs in zip(got[1:], want[1:]):
                    assert mine.shape == theirs.shape and mine.dtype == np.float32
                    np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-7)
    # the totals of dL/dM3, dL/dM4, dL/dM5 are all the sum of output3's weights of the channel
    _library_p3_gradient(fpn, features, 1, 1, 1)
    total = float(fpn.layer_blocks[1].weight.data[1].sum())
    for name in ("M3", "M4", "M5"):
        assert np.isclose(float(fpn.grads[name].sum()), total, rtol=1e-5), name


def test_top_down_solution_gives_the_library_values():
    solved = namespace(USE_SOLUTIONS=True)
    exec(source(exercise_cells("04_top_down_pathway.ipynb")["my_top_down"][1]), solved)
    fpn, features, expected = _tiny_pyramid_case()
    got = solved["my_top_down"](fpn, features)
    assert [p.shape for p in got] == [p.shape for p in expected] == [(1, 2, s, s) for s in (5, 3, 2, 1)]
    for mine, want in zip(got, expected):
        np.testing.assert_allclose(mine, want, rtol=1e-6, atol=1e-6)  # the same float32 ops


def _textbook_frozen_batch_norm(x, weight, bias, running_mean, running_var, eps=1e-5):
    # eval-mode batch norm as it is usually written: right, though not regrouped as the library's
    c = (1, -1, 1, 1)
    return (weight.reshape(c) * (x - running_mean.reshape(c)) / np.sqrt(running_var.reshape(c) + eps)
            + bias.reshape(c))


def _wrong_frozen_batch_norms():
    """{mistake: a my_frozen_batch_norm that makes it}: each must fail the notebook's check cell."""
    c = (1, -1, 1, 1)

    def no_eps(x, weight, bias, running_mean, running_var, eps=1e-5):
        scale = weight / np.sqrt(running_var)
        return x * scale.reshape(c) + (bias - running_mean * scale).reshape(c)

    def fixed_eps(x, weight, bias, running_mean, running_var, eps=1e-5):
        return _textbook_frozen_batch_norm(x, weight, bias, running_mean, running_var)  # eps ignored

    def batch_statistics(x, weight, bias, running_mean, running_var, eps=1e-5):
        mean, var = x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3))  # train-mode batch norm
        return _textbook_frozen_batch_norm(x, weight, bias, mean, var, eps)

    def shift_without_mean(x, weight, bias, running_mean, running_var, eps=1e-5):
        scale = weight / np.sqrt(running_var + eps)
        return x * scale.reshape(c) + bias.reshape(c)

    def in_place(x, weight, bias, running_mean, running_var, eps=1e-5):
        scale = weight / np.sqrt(running_var + eps)
        x *= scale.reshape(c)  # overwrites the caller's x
        x += (bias - running_mean * scale).reshape(c)
        return x

    def float64_out(x, weight, bias, running_mean, running_var, eps=1e-5):
        return _textbook_frozen_batch_norm(x.astype(np.float64), weight, bias, running_mean,
                                           running_var, eps)

    return {f.__name__: f for f in (no_eps, fixed_eps, batch_statistics, shift_without_mean, in_place,
                                    float64_out)}


def test_frozen_batch_norm_solution_gives_the_library_values():
    solved = namespace(USE_SOLUTIONS=True)
    exec(source(exercise_cells("10_pretraining_and_freezing.ipynb")["my_frozen_batch_norm"][1]), solved)
    x, weight, bias, mean, var = _tiny_frozen_bn_case()
    got = solved["my_frozen_batch_norm"](x, weight, bias, mean, var)
    np.testing.assert_allclose(got, F.frozen_batch_norm(x, weight, bias, mean, var)[0], rtol=1e-12)
    by_hand = np.concatenate([(x[:, :1] - 3.0) / np.sqrt(4.0 + 1e-5) + 0.5,
                              2.0 * (x[:, 1:] - 8.0) / np.sqrt(1e-7 + 1e-5) - 1.0], axis=1)
    np.testing.assert_allclose(got, by_hand, rtol=1e-12, atol=1e-12)  # cancellation near 0
    x32 = [a.astype(np.float32) for a in _tiny_frozen_bn_case()]
    assert solved["my_frozen_batch_norm"](*x32).dtype == np.float32


def test_frozen_batch_norm_check_cell_passes_right_answers_and_fails_wrong_ones(capsys):
    _, solution, check = exercise_cells("10_pretraining_and_freezing.ipynb")["my_frozen_batch_norm"]
    solved = namespace(USE_SOLUTIONS=True)
    exec(source(solution), solved)
    for right in (solved["my_frozen_batch_norm"], _textbook_frozen_batch_norm):
        exec(source(check), namespace(my_frozen_batch_norm=right))
        assert "correct!" in capsys.readouterr().out, right
    for mistake, wrong in _wrong_frozen_batch_norms().items():
        with pytest.raises(AssertionError):
            exec(source(check), namespace(my_frozen_batch_norm=wrong))
        assert "correct!" not in capsys.readouterr().out, f"the check cell passed {mistake}"


def _p3_gradient(fpn, shapes, channel, y, x, flip=False, copies="sum", offset=1, top_down=True,
                 to_c2=False):
    """my_p3_gradient written the right way (the defaults) or with one typical mistake."""
    w = fpn.layer_blocks[1].weight.data[channel]  # (d, 3, 3)
    if flip:  # the kernel turned 180 degrees, as in a full correlation, though dout is one-hot
        w = w[:, ::-1, ::-1]
    _, _, h3, w3 = shapes[1]
    d_m = np.zeros((1, w.shape[0], h3 + 2, w3 + 2), dtype=w.dtype)
    d_m[0, :, y + 1 - offset:y + 4 - offset, x + 1 - offset:x + 4 - offset] = w
    d_m3 = d_m = d_m[:, :, 1:-1, 1:-1]
    grads = [None]
    for i in (1, 2, 3):
        if i > 1:
            if not top_down:  # stops at C3: as if M3 fed nothing coarser
                grads.append(None)
                continue
            _, _, h, w_ = shapes[i]
            rows = np.eye(h, dtype=d_m.dtype)[F.nearest_source_index(h, d_m.shape[2], np)]
            cols = np.eye(w_, dtype=d_m.dtype)[F.nearest_source_index(w_, d_m.shape[3], np)]
            if copies == "mean":  # each cell averages its copies' gradients instead of summing them
                rows, cols = rows / rows.sum(axis=0), cols / cols.sum(axis=0)
            if copies == "first":  # each cell takes the gradient of one copy only
                rows, cols = rows * (np.cumsum(rows, axis=0) == 1), cols * (np.cumsum(cols, axis=0) == 1)
            d_m = rows.T @ d_m @ cols
        lateral = fpn.inner_blocks[i].weight.data[:, :, 0, 0]
        grads.append(np.einsum("dc,ndhw->nchw", lateral, d_m))
    if to_c2:  # as if the gradient flowed down the top-down pathway: M3's gradient upsampled into M2
        _, _, h2, w2 = shapes[0]
        rows = np.eye(h3, dtype=d_m3.dtype)[F.nearest_source_index(h3, h2, np)]  # (H2, H3)
        cols = np.eye(w3, dtype=d_m3.dtype)[F.nearest_source_index(w3, w2, np)]
        d_m2 = rows @ d_m3 @ cols.T
        grads[0] = np.einsum("dc,ndhw->nchw", fpn.inner_blocks[0].weight.data[:, :, 0, 0], d_m2)
    return grads


WRONG_P3_GRADIENTS = {
    "flipped kernel": dict(flip=True),
    "averaged copies": dict(copies="mean"),
    "one copy only": dict(copies="first"),
    "window one cell off": dict(offset=0),
    "no top-down backward": dict(top_down=False),
    "a gradient on C2": dict(to_c2=True),
}


def test_p3_gradient_check_cell_passes_right_answers_and_fails_wrong_ones(capsys):
    _, solution, check = exercise_cells("09_roialign_and_two_stage.ipynb")["my_p3_gradient"]
    solved = namespace(USE_SOLUTIONS=True)
    exec(source(solution), solved)
    for right in (solved["my_p3_gradient"], _p3_gradient):
        exec(source(check), namespace(FPN=FPN, SEED=0, my_p3_gradient=right))
        assert "correct!" in capsys.readouterr().out, right
    for mistake, options in WRONG_P3_GRADIENTS.items():
        def wrong(fpn, shapes, channel, y, x, options=options):
            return _p3_gradient(fpn, shapes, channel, y, x, **options)
        with pytest.raises(AssertionError):
            exec(source(check), namespace(FPN=FPN, SEED=0, my_p3_gradient=wrong))
        assert "correct!" not in capsys.readouterr().out, f"the check cell passed {mistake}"
