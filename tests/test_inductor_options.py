"""``--inductor-config``: inductor settings from the command line, checked and in the cache key."""

import argparse

import pytest
import torch

from musetalk_rt import inductor_options
from musetalk_rt.engines import get_engine
from musetalk_rt.errors import UserError


def test_settings_are_typed_from_torchs_own_defaults_and_sorted():
    got = inductor_options.parse(" triton.enable_pdl=TRUE, combo_kernels=1 ,")
    assert got == {"combo_kernels": True, "triton.enable_pdl": True}
    assert list(got) == ["combo_kernels", "triton.enable_pdl"]  # a stable cache key
    assert inductor_options.parse("combo_kernel_max_num_nodes=4") == {
        "combo_kernel_max_num_nodes": 4
    }
    assert inductor_options.parse({"combo_kernels": "off"}) == {"combo_kernels": False}
    # a value holding commas (the backends' lists); a key declared "str | None" stays text
    got = inductor_options.parse("max_autotune_gemm_backends=ATEN,TRITON,cuda.arch=90")
    assert got == {"cuda.arch": "90", "max_autotune_gemm_backends": "ATEN,TRITON"}
    assert inductor_options.parse(None) == {} and inductor_options.parse({}) == {}
    # the same settings however written give the same mapping
    assert inductor_options.parse("combo_kernels=yes") == inductor_options.parse(
        {"combo_kernels": True}
    )


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            "triton.enable_pld=true",
            "no setting 'triton.enable_pld'; did you mean triton.enable_pdl",
        ),
        ("freezing=true", "freezing: set it with --compile-freezing"),
        ("triton.cudagraphs=false", "set it with --compile-graph-capture / --no-cuda-graphs"),
        ("coordinate_descent_tuning=1", "set it with --compile-cd-tuning"),
        ("combo_kernels=maybe", "combo_kernels takes true or false"),
        ("combo_kernel_max_num_nodes=four", "takes an integer"),
        ("combo_kernels", "write KEY=VALUE"),
        ("=1", "write KEY=VALUE"),
        ("combo_kernels=", "write KEY=VALUE"),
        ("a b=1", "write KEY=VALUE"),
        ("combo_kernels=1,combo_kernels=0", "combo_kernels is given twice"),
        (",", "no KEY=VALUE given"),
    ],
)
def test_bad_settings_get_one_line_naming_the_fix(spec, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")) as exc:
        inductor_options.parse(spec)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize(
    "spec",
    [
        "worker_log_path=x",  # declared NoneType: torch.compile would refuse any value
        "cudagraph_policy=x",  # an enum
        "post_grad_custom_pre_pass=foo",  # a callable
    ],
)
def test_a_setting_the_command_line_cannot_type_is_refused(spec):
    """Typed from torch's declared type, not the default (None says nothing): anything but a
    boolean, a number or text is refused before a build could fail on it."""
    with pytest.raises(UserError, match="cannot set; set it in Python"):
        inductor_options.parse(spec)
    import torch._inductor.config as cfg

    key = next(k for k, v in cfg.get_config_copy().items() if isinstance(v, list | dict))
    with pytest.raises(UserError, match="cannot set; set it in Python"):
        inductor_options.parse(f"{key}=1")


def test_what_parse_accepts_torch_compile_accepts():
    """Every setting of a simple declared type, given as text, passes torch.compile's own check
    once typed (the last check parse makes); the packaging keys aoti owns are refused."""
    import torch._inductor.config as cfg

    n = 0
    for key, default in cfg.get_config_copy().items():
        if key in inductor_options.OWNED or isinstance(default, list | dict | tuple):
            continue
        value = str(default).lower() if isinstance(default, bool) else default
        if value is None or callable(value):
            continue
        try:
            inductor_options.parse({key: value})
        except UserError as exc:
            assert "cannot set" in str(exc), (key, exc)  # a type we refuse, never torch's error
            continue
        n += 1
    assert n > 300
    for key in ("aot_inductor.package", "aot_inductor.output_path"):
        with pytest.raises(UserError, match="set it with"):
            inductor_options.parse(f"{key}=x")


def test_the_parser_checks_syntax_without_torch_and_the_engines_get_the_text():
    from musetalk_rt.cli import _engine_options, build_parser, compile_argv

    with pytest.raises(argparse.ArgumentTypeError, match="write KEY=VALUE"):
        inductor_options.check_syntax("combo_kernels")
    argv = ["bench", "--inductor-config", "triton.enable_pdl=true,combo_kernels=1"]
    args = build_parser().parse_args(argv)
    opts = _engine_options(args)
    assert opts == {"inductor_config": "triton.enable_pdl=true,combo_kernels=1"}
    # a tool that starts a child process forwards it as given
    assert compile_argv(args)[-2:] == [
        "--inductor-config",
        "triton.enable_pdl=true,combo_kernels=1",
    ]
    # both inductor engines take it; the key covers it (absent when not given)
    for name in ("compile", "aoti"):
        with_it = get_engine(name, **opts).cache_options()
        assert with_it["inductor_config"] == {"combo_kernels": True, "triton.enable_pdl": True}
        assert "inductor_config" not in get_engine(name).cache_options()


def test_the_cli_refuses_an_unknown_setting_in_one_line(capsys):
    from musetalk_rt.cli import main

    rc = main(
        [
            "engines",
            "build",
            "--engine",
            "compile",
            "--weights",
            "tiny",
            "--inductor-config",
            "triton.enable_pld=1",
            "--device",
            "cpu",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and "did you mean triton.enable_pdl" in err


def test_compile_passes_the_settings_with_the_modes_own(monkeypatch):
    """The settings reach torch.compile as options, beside the mode's (torch.compile takes one
    or the other) and the stage autotuning; inductor knows every key given; another backend
    refuses them."""
    seen = {}
    real_compile = torch.compile

    def spy(model, **kw):
        seen.update(kw)
        return real_compile(model, backend="eager")

    monkeypatch.setattr(torch, "compile", spy)
    eng = get_engine("compile", inductor_config="combo_kernels=true", cuda_graphs=False)
    runner = eng.build(
        torch.nn.Linear(4, 4),
        lambda b: [torch.zeros(b, 4)],
        [1],
        torch.float32,
        torch.device("cpu"),
    )
    assert seen["options"] == {"combo_kernels": True} and seen["mode"] is None
    assert "inductor combo_kernels=True" in runner.report.reason
    real_compile(torch.nn.Identity(), options=seen["options"])  # inductor takes the options
    with pytest.raises(UserError, match="needs the inductor backend, not aot_eager"):
        get_engine("compile", backend="aot_eager", inductor_config="combo_kernels=true")


def test_compile_engine_settings_hold_in_its_calls_and_not_between(monkeypatch):
    """Freezing and coordinate descent are in inductor's config while dynamo traces the buckets
    (dynamo reads freezing there: weights traced as constants) and while a call after the build
    recompiles; between calls the config is as it was. A call that hits the traced graph does
    not retrace."""
    import torch._inductor.config as cfg
    from torch._dynamo.utils import is_parameter_freezing

    traced = []
    real_compile = torch.compile

    def spy(model, **kw):
        def backend(gm, example_inputs):  # called once per trace
            traced.append((is_parameter_freezing(), cfg.coordinate_descent_tuning))
            return gm.forward

        return real_compile(model, backend=backend, fullgraph=True, dynamic=False)

    monkeypatch.setattr(torch, "compile", spy)
    before = cfg.get_config_copy()

    def build(**opts):
        traced.clear()
        eng = get_engine("compile", cuda_graphs=False, **opts)
        conv, inputs = torch.nn.Conv2d(3, 4, 3), lambda b: [torch.zeros(b, 3, 8, 8)]
        return eng.build(conv, inputs, [2], torch.float32, torch.device("cpu"))

    runner = build(freezing=True, coordinate_descent=True)
    assert traced == [(True, True)]
    assert cfg.get_config_copy() == before
    with torch.inference_mode():
        runner.fns[2](torch.ones(2, 3, 8, 8))
        assert len(traced) == 1  # no retrace
        runner.fns[2](torch.ones(2, 3, 8, 8).contiguous(memory_format=torch.channels_last))
    assert traced == [(True, True)] * 2  # other strides: a recompile, with the engine's settings
    assert cfg.get_config_copy() == before
    build(freezing=False)  # nothing of the last build's settings is left for the next one
    assert traced == [(False, False)]


def test_rows_with_settings_get_a_line_of_their_own():
    from musetalk_rt.workbench.report import config_label

    row = {"engine": "compile", "dtype": "fp16", "engine_options": {"freezing": True}}
    assert config_label(row) == "compile fp16 (freezing)"
    pdl = {"freezing": True, "inductor_config": {"triton.enable_pdl": True}}
    assert config_label(dict(row, engine_options=pdl)) == (
        "compile fp16 (freezing, inductor-config=triton.enable_pdl=True)"
    )


def test_a_preset_may_hold_the_settings(tmp_path):
    from musetalk_rt.live.app import build_parser
    from musetalk_rt.live.preset import parse_with_preset

    f = tmp_path / "p.toml"
    f.write_text("[live]\ninductor_config = ['triton.enable_pdl=true', 'combo_kernels=1']\n")
    args = parse_with_preset(build_parser(), ["--config", str(f), "--avatar", "a"])
    assert inductor_options.parse(args.inductor_config) == {
        "combo_kernels": True,
        "triton.enable_pdl": True,
    }
    f.write_text("[live]\ninductor_config = 'combo_kernels'\n")
    with pytest.raises(UserError, match=r"inductor_config = 'combo_kernels': .*write KEY=VALUE"):
        parse_with_preset(build_parser(), ["--config", str(f), "--avatar", "a"])
