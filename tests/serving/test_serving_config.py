"""ServingConfig: the default file loads; every bad value fails at start naming the key."""

from dataclasses import replace
from pathlib import Path

import pytest

from serving.config import DEFAULT_CONFIG_PATH, ConfigError, ServingConfig, build_config, load_config


def test_default_config_loads():
    config = load_config(DEFAULT_CONFIG_PATH, env={})
    assert isinstance(config, ServingConfig)
    assert config.model_name == "popularity-v1"


def test_env_overrides_the_file():
    config = load_config(
        DEFAULT_CONFIG_PATH, env={"UGT_SERVING_STATE_READER": "feast", "UGT_SERVING_MAX_EXCLUDE": "10"}
    )
    assert config.state_reader == "feast" and config.max_exclude == 10


@pytest.mark.parametrize(
    "values, env, message",
    [
        ({"stat_reader": "redis"}, {}, "stat_reader: unknown key"),
        ({"state_reader": "cassandra"}, {}, "state_reader: Input should be 'feast' or 'redis'"),
        ({"generator": "ugt-xl"}, {}, "generator: Input should be 'popularity' or 'ugt'"),
        ({"port": "eighty"}, {}, "port: Input should be a valid integer"),
        ({"port": 70000}, {}, "port: Input should be less than or equal to 65535"),
        ({"popularity_refresh_s": 0}, {}, "popularity_refresh_s"),
        ({"max_body_bytes": 10}, {}, "max_body_bytes"),
        ({"popularity_cache_size": 100}, {}, "popularity_cache_size: must be >="),
        ({"default_domain": "a b"}, {}, "default_domain"),
        ({"popularity_file": "no/such.json"}, {}, "popularity_file: no such file"),
        ({"log_level": "loud"}, {}, "log_level"),
        ({"redis_timeout_ms": True}, {}, "redis_timeout_ms: a boolean is not a number"),
        ({}, {"UGT_SERVING_MAX_EXCLUDE": "many"}, "max_exclude: Input should be a valid integer.*from env UGT_SERVING_MAX_EXCLUDE"),
    ],
)
def test_bad_values_fail_naming_the_key(tmp_path, values, env, message):
    with pytest.raises(ConfigError, match=message):
        build_config(values, env=env, base_dir=tmp_path)


def test_every_problem_is_listed_at_once(tmp_path):
    with pytest.raises(ConfigError) as info:
        build_config({"port": -1, "generator": "x", "bogus": 1}, env={}, base_dir=tmp_path)
    assert all(key in str(info.value) for key in ("port", "generator", "bogus"))


def test_popularity_file_is_resolved_against_the_config_folder(tmp_path):
    (tmp_path / "pop.json").write_text('{"domains": {}}')
    (tmp_path / "serve.yaml").write_text("popularity_file: pop.json\n")
    assert load_config(tmp_path / "serve.yaml", env={}).popularity_file == str(tmp_path / "pop.json")


@pytest.mark.parametrize("text, message", [("- a\n- b\n", "must be a mapping"), ("a: [\n", "not valid YAML")])
def test_bad_files(tmp_path, text, message):
    path = tmp_path / "serve.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path, env={})


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read serving config"):
        load_config(tmp_path / "nope.yaml", env={})


def test_start_fails_on_a_bad_popularity_file_or_feature_repo(tmp_path, monkeypatch):
    import redis

    from infra.settings import Settings
    from serving.compose import build_components

    bad = tmp_path / "pop.json"
    bad.write_text('{"domains": {"movie": [{"item_id": 7}]}}')
    client = redis.Redis(port=1)  # never contacted while building
    with pytest.raises(ConfigError, match=r"popularity_file: .*domains.movie\[0\]"):
        build_components(Settings(), ServingConfig(popularity_file=str(bad)), client)
    monkeypatch.setenv("UGT_FEATURE_REPO", str(tmp_path / "no-repo"))
    with pytest.raises(ConfigError, match="state_reader redis: cannot use"):
        build_components(Settings(), ServingConfig(state_reader="redis"), client)


def test_the_shipped_config_runs_the_engine_in_its_own_process_and_bad_engines_are_refused():
    assert load_config(DEFAULT_CONFIG_PATH, env={}).engine == "auto"  # process on CPU, thread on GPU
    assert ServingConfig().engine == "thread"  # the library default: apps hosted in-process (tests) do not fork
    with pytest.raises(ConfigError, match="engine: Input should be 'auto', 'thread' or 'process'"):
        build_config({"engine": "fork"}, env={})


def test_engine_hang_timeout_is_bounded():
    with pytest.raises(ConfigError, match="engine_hang_timeout_ms: Input should be greater than or equal to 100"):
        build_config({"engine_hang_timeout_ms": 5}, env={})


def test_the_shipped_config_compiles_cpu_models_and_the_env_can_turn_it_off():
    assert load_config(DEFAULT_CONFIG_PATH, env={}).torch_compile is True
    assert ServingConfig().torch_compile is False  # the library default: in-process apps (tests) start fast
    assert load_config(DEFAULT_CONFIG_PATH, env={"UGT_SERVING_TORCH_COMPILE": "false"}).torch_compile is False
    with pytest.raises(ConfigError, match="torch_compile: Input should be a valid boolean"):
        build_config({"torch_compile": "sometimes"}, env={})


def test_rank_top_follows_the_checkpoint_by_default_and_is_bounded():
    assert load_config(DEFAULT_CONFIG_PATH, env={}).rank_top == -1 == ServingConfig().rank_top
    assert load_config(DEFAULT_CONFIG_PATH, env={"UGT_SERVING_RANK_TOP": "0"}).rank_top == 0
    with pytest.raises(ConfigError, match="rank_top: Input should be greater than or equal to -1"):
        build_config({"rank_top": -5}, env={})
    with pytest.raises(ConfigError, match="rank_top: Input should be a valid integer"):
        build_config({"rank_top": "many"}, env={})


def test_beam_size_is_off_by_default_and_bounded():
    assert load_config(DEFAULT_CONFIG_PATH, env={}).beam_size == 0
    assert load_config(DEFAULT_CONFIG_PATH, env={"UGT_SERVING_BEAM_SIZE": "50"}).beam_size == 50
    with pytest.raises(ConfigError, match="beam_size: Input should be greater than or equal to 0"):
        build_config({"beam_size": -1}, env={})


def test_a_relative_path_from_the_environment_resolves_against_the_working_directory(tmp_path, monkeypatch):
    """The README's `UGT_SERVING_GENERATOR=ugt UGT_SERVING_CHECKPOINT=runs/.../checkpoint.pt ugt serve`."""
    checkpoint = tmp_path / "runs" / "ugt-ml100k-tiny" / "checkpoint.pt"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"")  # the config only checks that it exists
    monkeypatch.chdir(tmp_path)
    env = {"UGT_SERVING_GENERATOR": "ugt", "UGT_SERVING_CHECKPOINT": "runs/ugt-ml100k-tiny/checkpoint.pt"}
    assert load_config(DEFAULT_CONFIG_PATH, env=env).checkpoint == str(checkpoint)
    # the same words in a YAML file still mean "beside the file"
    folder = tmp_path / "configs"
    folder.mkdir()
    (folder / "serve.yaml").write_text("generator: ugt\ncheckpoint: ../runs/ugt-ml100k-tiny/checkpoint.pt\n")
    assert Path(load_config(folder / "serve.yaml", env={}).checkpoint).resolve() == checkpoint
    (folder / "serve.yaml").write_text("generator: ugt\ncheckpoint: runs/ugt-ml100k-tiny/checkpoint.pt\n")
    with pytest.raises(ConfigError, match=r"checkpoint: no such file '.*configs/runs/ugt-ml100k-tiny/checkpoint.pt'"):
        load_config(folder / "serve.yaml", env={})


def test_command_line_overrides_win_and_are_named_when_bad(tmp_path):
    config = load_config(DEFAULT_CONFIG_PATH, env={"UGT_SERVING_HOST": "0.0.0.0"}, overrides={"port": 9001})
    assert (config.host, config.port) == ("0.0.0.0", 9001)
    assert load_config(DEFAULT_CONFIG_PATH, env={}, overrides={"host": "::1", "port": None}).port == 0
    with pytest.raises(ConfigError, match="host: String should have at least 1 character.*from the command line"):
        load_config(DEFAULT_CONFIG_PATH, env={}, overrides={"host": ""})


def test_rerank_errors_name_the_category_and_env_values_are_parsed(tmp_path):
    with pytest.raises(ConfigError) as info:
        build_config({"rerank": {"boosts": {"Comedy": 0}, "caps": {"Horror": "two"}, "colour": 1}}, env={})
    text = str(info.value)
    assert "rerank.boosts.Comedy: Input should be greater than 0, got 0" in text
    assert "rerank.caps.Horror: Input should be a valid integer" in text
    assert "rerank.colour: unknown key (known keys: boosts, caps, diversity, drop_categories, fresh_rate, fresh_slots, pool)" in text
    env = {"UGT_SERVING_TORCH_COMPILE": "yes", "UGT_SERVING_RATE_LIMIT_RPS": "2.5", "UGT_SERVING_LOG_LEVEL": "DEBUG"}
    config = build_config({"generator_version": 2}, env=env, base_dir=tmp_path)
    assert (config.torch_compile, config.rate_limit_rps, config.log_level, config.model_name) == (
        True, 2.5, "debug", "popularity-2")


def test_configs_built_in_code_are_validated_too():
    with pytest.raises(ValueError, match="less than or equal to 65535"):
        ServingConfig(port=70000)
    assert replace(ServingConfig(), max_context=3).max_context == 3


def test_kv_cache_admission_is_lru_unless_second_sight_is_asked_for():
    assert ServingConfig().kv_cache_admission == "lru"
    assert build_config({}, env={"UGT_SERVING_KV_CACHE_ADMISSION": "second_sight"}).kv_cache_admission == "second_sight"
    with pytest.raises(ConfigError, match="kv_cache_admission: Input should be 'lru' or 'second_sight'"):
        build_config({"kv_cache_admission": "lfu"}, env={})


def test_quantize_names_a_known_variant_and_int8_runs_uncompiled():
    assert ServingConfig().quantize == "none"
    assert build_config({"quantize": "int8"}, env={}).quantize == "int8"
    assert build_config({}, env={"UGT_SERVING_QUANTIZE": "int8"}).quantize == "int8"
    assert build_config({"quantize": "fp8"}, env={}).quantize == "fp8"
    assert build_config({}, env={"UGT_SERVING_QUANTIZE": "int8_weight"}).quantize == "int8_weight"
    with pytest.raises(ConfigError, match="quantize: Input should be 'none', 'int8', 'fp8' or 'int8_weight'"):
        build_config({"quantize": "int4"}, env={})
    with pytest.raises(ConfigError, match="quantize: int8 runs uncompiled"):
        build_config({"quantize": "int8", "torch_compile": True}, env={})
    # fp8 / int8_weight: torch_compile only acts on CPU, where the engine refuses the pair at start
    assert build_config({"quantize": "fp8", "torch_compile": True}, env={}).quantize == "fp8"


def test_the_supervisors_cpu_copy_leaves_gpu_only_engine_keys_to_the_spawned_engine():
    """`ugt serve --workers N` on a GPU box composes a CPU copy of the service first (serving/engine_spawn.py): the
    keys only a CUDA engine runs (paged_attention, fp8) must not stop that copy; the spawned engine checks them."""
    from serving.engine_spawn import on_cpu

    gpu = build_config({"device": "cuda", "paged_attention": True, "quantize": "fp8", "kv_cache_users": 5000}, env={})
    copy = on_cpu(gpu)
    assert (copy.device, copy.paged_attention, copy.quantize, copy.kv_cache_users) == ("cpu", False, "none", 1)
    assert on_cpu(replace(gpu, quantize="int8_weight")).quantize == "int8_weight"  # it runs on CPU too
