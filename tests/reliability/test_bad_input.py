"""The bad-input catalogue: each malformed input ends the same way.

Exit 2 (or 1, documented, for an error raised by the pipeline's own code), one clear
message naming the file, key or flag and the fix, no traceback, and no run left RUNNING.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow

NODES = "examples/digits/src/digits/pipelines/train/nodes.py"


def patch_node(returned: str):
    """A setup that makes evaluate_model return ``returned`` as the metrics dict."""

    def setup(ws):
        path = ws.path / NODES
        text = path.read_text()
        path.write_text(text.replace('    predicted = estimator.predict(X_test)\n    return {',
                                     f'    predicted = estimator.predict(X_test)\n    return {returned}\n    return {{'))

    return setup


def write(relative: str, text: str):
    def setup(ws):
        (ws.path / relative).parent.mkdir(parents=True, exist_ok=True)
        (ws.path / relative).write_text(text)

    return setup


def append(relative: str, text: str):
    def setup(ws):
        with open(ws.path / relative, "a") as f:
            f.write(text)

    return setup


B = ["+experiment=baseline"]
S = ["-m", "+experiment=baseline", "+study=tune"]
G = ["-m", "+experiment=baseline", "params.model.C=0.1,1"]
PARAMS = "examples/digits/conf/base/parameters.yml"

NESTED = "\n" + "".join(f"{'  ' * i}k{i}:\n" for i in range(150)) + "  " * 150 + "leaf: 1\n"

CATALOGUE = [
    # (id, args, setup, exit code, fragments of the message)
    ("override-key-too-long", B + ["+params." + "x" * 300 + "=1"], None, 2,
     ["has a part of 300 characters", "Shorten the name"]),
    ("register-alias-space", ["register", "0a1b", "--name", "digits", "--alias", "my alias"], None, 2,
     ["--alias 'my alias'", "Names may only contain"]),
    ("register-alias-reserved", ["register", "0a1b", "--name", "digits", "--alias", "v1"], None, 2,
     ["--alias 'v1'", "is reserved"]),
    ("params-nested-too-deep", B, append(PARAMS, NESTED), 2, ["nest deeper than", "Flatten the deepest section"]),
    ("unknown-param", B + ["params.modle.C=5"], None, 2, ["params.modle", "Did you mean params.model"]),
    ("db-driver-missing", B + ["mlflow.tracking_uri=mysql://u:hunter22@127.0.0.1:1/db"], None, 2,
     ["No module named 'MySQLdb'", "pip install pymysql", "u:***@127.0.0.1"]),
    ("hydra-launcher", G + ["hydra/launcher=pool"], write("conf/hydra/launcher/pool.yaml", "n_jobs: 2\n"), 2,
     ["hydra/launcher=pool", "does not use Hydra's launchers", "sweep.n_jobs"]),
    ("hydra-sweeper", G + ["hydra/sweeper=other"], write("conf/hydra/sweeper/other.yaml", "x: 1\n"), 2,
     ["hydra/sweeper=other", "kmrun sweeps itself"]),
    ("param-type-float", B + ["params.model.C=abc"], None, 2, ["'abc' (str) does not fit the parameter's float"]),
    ("param-type-int", B + ["params.split.seed=1.5"], None, 2, ["1.5 (float) does not fit the parameter's int"]),
    ("param-section-scalar", B + ["params.model=3"], None, 2, ["replaces a whole section"]),
    ("unknown-experiment", ["+experiment=nope"], None, 2, ["Could not find 'experiment/nope'", "baseline", "forest"]),
    ("unknown-group-option", B + ["model=svm"], None, 2, ["Could not find 'model/svm'", "random_forest"]),
    ("yaml-syntax", ["+experiment=broken"], write("conf/experiment/broken.yaml", "# @package _global_\nparams:\n  model: {C: 1\n"),
     2, ["YAML syntax error", "broken.yaml", "line 3"]),
    ("unknown-key-kedro", B + ["kedro.pipline=x"], None, 2, ["Unknown key 'kedro.pipline'", "Did you mean 'pipeline'"]),
    ("unknown-key-mlflow", B + ["mlflow.trackin_uri=x"], None, 2, ["Unknown key 'mlflow.trackin_uri'", "tracking_uri"]),
    ("unknown-key-objective-file", ["+experiment=typo"], write("conf/experiment/typo.yaml", "# @package _global_\nobjective:\n  metrc: accuracy\n"),
     2, ["Unknown key 'objective.metrc'", "conf/experiment/typo.yaml", "Did you mean 'metric'"]),
    ("unknown-key-sweep", B + ["sweep.n_job=2"], None, 2, ["Unknown key 'sweep.n_job'", "n_jobs"]),
    ("unknown-key-study", B + ["study.n_trails=3"], None, 2, ["Unknown key 'study.n_trails'", "n_trials"]),
    ("unknown-top-level", B + ["verbos=true"], None, 2, ["Unknown key 'verbos'", "verbose"]),
    ("wrong-type-tags", B + ["kedro.tags=3"], None, 2, ["'kedro.tags'", "wrong type"]),
    ("bad-direction", B + ["objective.direction=up"], None, 2, ["objective.direction is 'up'", "minimize, maximize"]),
    ("not-a-kedro-project", B + ["kedro.project_path=/"], None, 2, ["is not a Kedro project", "kedro.project_path"]),
    ("unknown-pipeline", B + ["kedro.pipeline=trian"], None, 2, ["no pipeline named 'trian'", "Did you mean train"]),
    ("unknown-env", B + ["kedro.env=prod"], None, 2, ["no environment 'prod'", "Available: base, local"]),
    ("missing-config-dir", B + ["-cp", "/nonexistent/conf"], None, 2, ["kmrun.yaml"]),
    ("bad-tracking-scheme", B + ["mlflow.tracking_uri=foo://bar"], None, 2, ["cannot open the MLflow store 'foo://bar'"]),
    ("unwritable-store", B + ["mlflow.tracking_uri=sqlite:///conf/kmrun.yaml/mlflow.db"], None, 2, ["cannot open the MLflow store"]),
    ("bad-override-syntax", B + ["params.model.C=interval(0.1"], None, 2, ["Bad override or sweep expression 'params.model.C=interval(0.1'"]),
    ("missing-metric", B + ["objective.metric=auc"], None, 2, ["'auc' was not produced", "accuracy, f1_macro", "metrics"]),
    ("missing-metric-dataset", B + ["metrics=[scores]"], None, 2, ["'accuracy' was not produced", "Datasets the pipeline saved"]),
    ("non-numeric-objective", B, patch_node('{"accuracy": "high"}'), 2, ["'accuracy' is 'high' (str), not a number"]),
    ("nan-objective", B, patch_node('{"accuracy": float("nan")}'), 2, ["'accuracy' is nan, not a finite number"]),
    ("node-error", B + ["params.model.type=svm"], None, 1, ["ValueError", "Unknown model.type 'svm'", "traceback.txt"]),
    ("grid-interval", ["-m", "+experiment=baseline", "params.model.C=interval(0,1)"], None, 2, ["a grid needs discrete values"]),
    ("empty-range", ["-m", "+experiment=baseline", "params.split.seed=range(3,1)"], None, 2, ["expands to no value"]),
    ("param-typo-in-file", ["+experiment=typo"], write("conf/experiment/typo.yaml", "# @package _global_\nparams:\n  split:\n    sed: 3\n"),
     2, ["params.split.sed (in conf/experiment/typo.yaml)", "params.split.seed"]),
    ("unknown-search-space-key", S + ["params.model.maxiter=int(interval(1,5))"], None, 2, ["no parameter 'model.maxiter'"]),
    ("empty-sweep", ["-m", "+experiment=baseline", "params.model.C=0.1"], None, 2, ["Empty sweep"]),
    ("bad-range", ["-m", "+experiment=baseline", "params.split.seed=range(0,x)"], None, 2, ["Bad override or sweep expression"]),
    ("unsweepable-key", ["-m", "+experiment=baseline", "mlflow.run_name=a,b"], None, 2, ["'mlflow.run_name' cannot be swept"]),
    ("inverted-interval", S + ["params.model.C=interval(5,1)"], None, 2, ["the interval is empty or inverted"]),
    ("log-low-zero", S + ["params.model.C=tag(log, interval(0, 1))"], None, 2, ["a log scale needs LOW > 0"]),
    ("unknown-sampler", S + ["study.sampler.name=annealing"], None, 2, ["study.sampler.name is 'annealing'", "tpe, random"]),
    ("sampler-package-missing", S + ["study.sampler.name=cmaes"], None, 2, ["needs the package cmaes: pip install cmaes"]),
    ("unknown-pruner", S + ["study.pruner.name=early"], None, 2, ["study.pruner.name is 'early'", "median"]),
    ("bad-pruner-option", S + ["study.pruner.name=median", "study.pruner.n_warmup=3"], None, 2, ["MedianPruner accepts: n_startup_trials"]),
    ("directions-mismatch", S + ["objective.metric=[accuracy,f1_macro]", "objective.direction=[maximize,minimize,maximize]"],
     None, 2, ["names 2 metric(s) but objective.direction gives 3"]),
    ("grid-sampler-continuous", S + ["study.sampler.name=grid"], None, 2, ["grid needs discrete values", "params.model.C"]),
    ("unreachable-storage", S + ["study.storage=postgresql://u:pw@127.0.0.1:1/db"], None, 2,
     ["cannot open the Optuna storage 'postgresql://u:***@127.0.0.1:1/db'"]),
    ("unquoted-url-query", B + ["mlflow.tracking_uri=postgresql://u@/db?host=/tmp/x&port=5"], None, 2,
     ["must be quoted: mlflow.tracking_uri='postgresql://u@/db?host=/tmp/x&port=5'"]),
    ("unreachable-grid-storage", G + ["sweep.storage=postgresql://u:pw@127.0.0.1:1/db"], None, 2,
     ["sweep.storage: cannot open the Optuna storage 'postgresql://u:***@127.0.0.1:1/db'",
      "null (the MLflow store coordinates the grid)"]),
    ("unknown-subcommand", ["runz"], None, 2, ["Unknown subcommand 'runz'", "runs"]),
    ("unknown-subcommand-option", ["runs", "--bogus"], None, 2, ["unrecognized arguments: --bogus"]),
    ("unknown-run-id", ["show", "ffffffffzz"], None, 2, ["No run with id 'ffffffffzz'"]),
    # reliability, round two
    ("param-name-mlflow-rejects", B, append(PARAMS, '"lr (a)": 0.1\n'), 2,
     ["MLflow cannot store a parameter named 'lr (a)'", "Names may only contain"]),
    ("metric-name-mlflow-rejects", B, patch_node('{"accuracy": 0.9, "f1 (macro)": 0.5}'), 2,
     ["'f1 (macro)', which MLflow cannot store", "Rename them"]),
    ("interval-inf", S + ["params.model.C=interval(0.1,inf)"], None, 2, ["both ends of the interval must be finite"]),
    ("n-trials-zero", S + ["study.n_trials=0"], None, 2, ["study.n_trials is 0; use 1 or more"]),
    ("n-trials-negative", S + ["study.n_trials=-1"], None, 2, ["study.n_trials is -1"]),
    ("more-negative", S + ["study.more=-5"], None, 2, ["study.more is -5"]),
    ("study-n-jobs-zero", S + ["study.n_jobs=0"], None, 2, ["study.n_jobs is 0"]),
    ("timeout-negative", S + ["study.timeout=-1"], None, 2, ["study.timeout is -1.0"]),
    ("study-max-failures-zero", S + ["study.max_failures=0"], None, 2, ["study.max_failures is 0.0"]),
    ("sweep-n-jobs-zero", G + ["sweep.n_jobs=0"], None, 2, ["sweep.n_jobs is 0"]),
    ("sweep-n-jobs-negative", G + ["sweep.n_jobs=-1"], None, 2, ["sweep.n_jobs is -1"]),
    ("store-patience-negative", B + ["store_patience=-1"], None, 2, ["store_patience is -1.0", "from 0"]),
    ("store-patience-text", B + ["store_patience=soon"], None, 2, ["store_patience"]),
    ("sweep-max-failures-negative", G + ["sweep.max_failures=-1"], None, 2, ["sweep.max_failures is -1.0"]),
    ("export-best-climbs-out", S + ["study.export_best=../../../x"], None, 2, ["study.export_best '../../../x'", "plain name"]),
    ("promote-name-climbs-out", ["promote", "abc", "--name", "../kmrun", "--force"], None, 2, ["--name '../kmrun'"]),
    ("promote-name-absolute", ["promote", "abc", "--name", "/tmp/x"], None, 2, ["--name '/tmp/x'"]),
    ("study-searches-a-secret", S + ["+params.api_token=choice(aaaa,bbbb)"], None, 2, ["names a secret"]),
    ("unreachable-http-store", B + ["mlflow.tracking_uri=http://127.0.0.1:1"], None, 2, ["cannot reach the MLflow server"]),
    ("unreachable-postgres-store", B + ["mlflow.tracking_uri=postgresql://u:pw@127.0.0.1:1/db"], None, 2,
     ["mlflow.tracking_uri: cannot open the MLflow store 'postgresql://u:***@127.0.0.1:1/db'", "Connection refused"]),
    ("damaged-store-run", B, write("mlflow.db", "not a database " * 100), 2, ["cannot open the MLflow store"]),
    ("damaged-store-runs", ["runs"], write("mlflow.db", "not a database " * 100), 2, ["Cannot read the MLflow store"]),
    ("damaged-store-best", ["best"], write("mlflow.db", "not a database " * 100), 2, ["Cannot read the MLflow store"]),
    ("damaged-store-show", ["show", "abc"], write("mlflow.db", "not a database " * 100), 2, ["Cannot read the MLflow store"]),
    ("sweep-dir-unwritable", G + ["sweep.dir=/proc/kmrun-x"], None, 2, ["sweep.dir: cannot create /proc/kmrun-x"]),
    ("grid-missing-objective", G + ["objective.metric=r2"], None, 2, ["Stopped: C=0.1", "'r2' was not produced",
                                                                        "accuracy, f1_macro", "none more was started"]),
    ("sweep-without-m", B + ["params.model.C=0.1,1"], None, 2, ["is a sweep: run it with kmrun -m"]),
    ("family-unknown-option", ["-m", "+experiment=baseline", "+study=fam"],
     write("conf/study/fam.yaml", "# @package _global_\nstudy:\n  search_space:\n    model:\n      xgboost:\n"
           "        params.model.C: interval(1, 2)\n"), 2, ["study.search_space.model.xgboost", "has no option 'xgboost'",
                                                     "logistic_regression, random_forest, sgd"]),
    ("family-key-of-another-option", ["-m", "+experiment=baseline", "+study=fam"],
     write("conf/study/fam.yaml", "# @package _global_\nstudy:\n  search_space:\n    model:\n"
           "      logistic_regression:\n        params.model.n_estimators: int(interval(5, 9))\n"), 2,
     ["params.model.n_estimators is not in the config of model=logistic_regression", "it is in model=random_forest"]),
    ("family-empty-option", ["-m", "+experiment=baseline", "+study=fam"],
     write("conf/study/fam.yaml", "# @package _global_\nstudy:\n  search_space:\n    model:\n      sgd: {}\n"), 2,
     ["study.search_space.model.sgd is empty"]),
    ("family-unknown-group", ["-m", "+experiment=baseline", "+study=fam"],
     write("conf/study/fam.yaml", "# @package _global_\nstudy:\n  search_space:\n    modle:\n      sgd:\n"
           "        params.model.alpha: interval(0.1, 1)\n"), 2, ["'modle' is not a config group", "model"]),
    ("family-grid-sampler", S[:2] + ["+study=families", "study.sampler.name=grid"], None, 2,
     ["study.sampler grid cannot search a conditional space"]),
    ("constraint-syntax", S + ["+objective.constraints=['accuracy > 0.9']"], None, 2,
     ["objective.constraints[0] is 'accuracy > 0.9'", "METRIC <= NUMBER"]),
    ("enqueue-outside-range", S + ["+study.enqueue=[{params.model.C: 50}]"], None, 2,
     ["study.enqueue[0]: params.model.C=50 is outside its range", "interval(0.001, 10), log scale"]),
    ("enqueue-unknown-key", S + ["+study.enqueue=[{params.model.alpha: 0.5}]"], None, 2,
     ["study.enqueue[0]: params.model.alpha is not searched by this study"]),
    ("enqueue-experiment-without-keys", S + ["+study.enqueue=[forest]"], None, 2,
     ["the experiment 'forest' sets none of the keys this study searches"]),
    ("gpus-on-a-machine-without", G + ["ray.resources.gpus=1"], None, 2,  # no GPU on the test machines
     ["ray.resources.gpus is 1", "this machine shows 0", "drop it to run on CPUs"]),
    ("unknown-flag", B + ["--bogus"], None, 2, ["Unknown option '--bogus'"]),
    ("bad-cfg-value", ["--cfg", "nope"], None, 2, ["--cfg nope: use job, hydra or all"]),
    ("unreadable-credentials", B, write("examples/digits/conf/local/credentials.yml", "db:\n  password: ${oc.env:KMRUN_NOT_SET_ANYWHERE}\n"),
     2, ["Cannot read the Kedro credentials", "keep their values out of MLflow"]),
    ("yaml-alias-bomb", B, write("conf/experiment/bomb.yaml", "# @package _global_\n" + "".join(
        f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9) if i else '1, 2, 3, 4, 5, 6, 7, 8, 9'}]\n" for i in range(9))),
     2, ["conf/experiment/bomb.yaml: its YAML aliases", "expand to more than"]),
    ("two-thousand-unknown-params", ["+experiment=many"], write("conf/experiment/many.yaml", "# @package _global_\nparams:\n" + "".join(
        f"  unknown_{i}: {i}\n" for i in range(2000))), 2, ["params.unknown_0", "... and 1992 more like these."]),
]


@pytest.mark.parametrize(("args", "setup", "code", "fragments"), [c[1:] for c in CATALOGUE], ids=[c[0] for c in CATALOGUE])
def test_bad_input(ws, args, setup, code, fragments):
    if setup:
        setup(ws)
    done = ws.kmrun(*args)
    assert done.code == code, done.text
    for fragment in fragments:
        assert fragment in done.err, (fragment, done.err)
    assert "Traceback" not in done.text
    assert "hunter22" not in done.text  # a password in a URL is never shown
    assert len(done.err.strip().splitlines()) <= 12, done.err  # one paragraph, not a log
    assert "did not come back within" not in done.err  # a store that never answered is not waited for
    assert ws.running() == 0


@pytest.mark.parametrize("ask", [["-v"], ["HYDRA_FULL_ERROR"]])
def test_a_traceback_only_when_asked(ws, ask):
    env = {"HYDRA_FULL_ERROR": "1"} if ask == ["HYDRA_FULL_ERROR"] else None
    args = ["+experiment=baseline", "params.modle.C=5"] + ([] if env else ask)
    done = ws.kmrun(*args, env=env)
    assert done.code == 2 and "Traceback" in done.err and "no parameter 'modle'" in done.err


def test_a_pipeline_error_suggests_no_kedro_command(ws):
    done = ws.kmrun("+experiment=baseline", "params.model.type=svm")
    assert done.code == 1 and "Unknown model.type 'svm'" in done.err
    assert "--from-nodes" not in done.text and "kedro run" not in done.text
