"""What a finished ``kdlab tune`` search writes (``<out>/``): ``best.yaml`` (the recipe with the best
values), ``trials.csv``, ``importances.csv``, the Optuna plots and ``tune.json``."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import yaml

from kdlab.core.io import atomic_write_text, save_and_close
from kdlab.experiments.tune_space import with_values
from kdlab.experiments.tune_storage import optuna_module


def best_recipe(spec, study):
    """The base recipe with the best trial's values, named ``<name>-tuned``."""
    best = study.best_trial
    r = with_values(spec.base(), best.params)
    d = r.to_dict()
    d["name"] = f"{r.name}-tuned"
    vals = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in best.params.items())
    d["description"] = f"{r.name} tuned by kdlab tune (trial {best.number}, {spec.metric} {best.value:.4f}): {vals}"
    out = spec.get_task().from_dict(d, spec.source or "tuned recipe")
    out.source = spec.source
    return out


def trials_rows(study) -> list[dict]:
    """One row per trial: number, state, value, parameters, epochs, duration, retries, errors."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        dur = (t.datetime_complete - t.datetime_start).total_seconds() \
            if t.datetime_complete and t.datetime_start else None
        ua = t.user_attrs
        rows.append({"number": t.number, "state": t.state.name, "value": t.value,
                     **{f"param:{k}": v for k, v in t.params.items()},
                     "epochs_reported": len(t.intermediate_values), "epochs_run": ua.get("epochs_run"),
                     "best_epoch": ua.get("best_epoch"), "duration_s": dur, "retry_of": ua.get("retry_of"),
                     "note": ua.get("error") or ua.get("failed_because") or ua.get("note") or "", "run_dir": ua.get("run_dir")})
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return [{k: r.get(k) for k in keys} for r in rows]


def write_outputs(spec, study, out_dir: Path, log=print) -> dict:
    """best.yaml, trials.csv, importances.csv, tune.json and the three plots."""
    optuna = optuna_module()
    from optuna.trial import TrialState

    from kdlab.core.io import write_csv

    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(out_dir / "trials.csv", trials_rows(study))
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        raise RuntimeError(f"no trial of study '{study.study_name}' completed; see {out_dir / 'trials.csv'}")
    best = best_recipe(spec, study)
    atomic_write_text(out_dir / "best.yaml", yaml.safe_dump(best.to_dict(), sort_keys=False))
    importances = {}
    import matplotlib

    matplotlib.use("Agg")
    from optuna.visualization import matplotlib as ovm

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
        if len(complete) >= 2 and len(spec.params) >= 1:
            try:
                importances = optuna.importance.get_param_importances(study)
            except (RuntimeError, ValueError) as e:  # e.g. all trials with the same value
                log(f"parameter importances not computed: {e}")
        write_csv(out_dir / "importances.csv", [{"param": k, "importance": v} for k, v in importances.items()])
        plots = [("history.png", ovm.plot_optimization_history, {})]
        if len(spec.params) > 1 or len(complete) > 1:
            plots.append(("parallel.png", ovm.plot_parallel_coordinate, {}))
        if importances:
            plots.append(("importances.png", ovm.plot_param_importances, {}))
        for fname, fn, kw in plots:
            ax = fn(study, **kw)
            fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
            name = f"{spec.metric} ({'higher' if spec.direction == 'maximize' else 'lower'} is better)"
            for a in fig.axes:  # Optuna says "Objective Value": name the tuned metric instead
                a.set_ylabel(a.get_ylabel().replace("Objective Value", name))
                a.set_xlabel(a.get_xlabel().replace("Objective Value", name))
                a.set_title(a.get_title().replace("Objective Value", spec.metric)
                            + (f": {name}" if "History" in a.get_title() else ""))
                labels = [t.get_text() for t in a.get_xticklabels()]
                if any("Objective Value" in t for t in labels):
                    a.set_xticks(a.get_xticks(), [t.replace("Objective Value", spec.metric) for t in labels])
                leg = a.get_legend()
                for t in (leg.get_texts() if leg is not None else []):
                    t.set_text(t.get_text().replace("Objective Value", f"{spec.metric} of a trial"))
            fig.set_size_inches(9, 5)
            fig.tight_layout()
            save_and_close(fig, out_dir / fname, dpi=110)
    states = {}
    for t in study.get_trials(deepcopy=False):
        states[t.state.name] = states.get(t.state.name, 0) + 1
    summary = {"study": study.study_name, "metric": spec.metric, "direction": spec.direction,
               "best_trial": study.best_trial.number, "best_value": study.best_value,
               "best_params": study.best_trial.params, "trials": states, "importances": importances,
               "settings": spec.identity()}
    atomic_write_text(out_dir / "tune.json", json.dumps(summary, indent=2, default=str))
    log(f"best trial {study.best_trial.number}: {spec.metric} {study.best_value:.4f}  "
        f"({', '.join(f'{k}={v}' for k, v in states.items())})")
    log(f"tuned recipe: {out_dir / 'best.yaml'}  (trials.csv, importances.csv, history.png, parallel.png)")
    return summary
