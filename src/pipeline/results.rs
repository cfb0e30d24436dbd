//! Flow results: the record of each run that ended, built from what the
//! engine (or the consent phase) says ended, and stored with the state
//! change that ended it (see [`crate::store::Commit::results`]).

use std::collections::BTreeMap;

use crate::flow::{EndedRun, SCRIPT_STATE_VAR};
use crate::store::{ConvKey, RunResult};

/// The results of the runs in `ended`, which ended at `now` in the
/// conversation `key`, whose contact fields are now `contact`.
pub(crate) fn of(
    key: &ConvKey,
    ended: &[EndedRun],
    contact: &BTreeMap<String, String>,
    now: i64,
) -> Vec<RunResult> {
    ended
        .iter()
        .map(|e| RunResult {
            flow: e.run.flow.clone(),
            to: key.to.clone(),
            contact: key.from.clone(),
            started_at: e.run.started_at,
            ended_at: now,
            ended: e.how.as_str().to_owned(),
            path: e.run.path.clone(),
            vars: vars_of(&e.run.vars),
            fields: contact.clone(),
        })
        .collect()
}

/// A run's variables for its result. A script flow keeps its `state` as
/// JSON in one hidden variable: its entries become the variables (text
/// as it is, other values as JSON).
fn vars_of(vars: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    let Some(state) = vars.get(SCRIPT_STATE_VAR) else {
        return vars.clone();
    };
    let mut out: BTreeMap<String, String> = vars
        .iter()
        .filter(|(k, _)| k.as_str() != SCRIPT_STATE_VAR)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if let Ok(serde_json::Value::Object(map)) = serde_json::from_str(state) {
        for (k, v) in map {
            let text = match v {
                serde_json::Value::String(s) => s,
                other => other.to_string(),
            };
            out.insert(k, text);
        }
    }
    out
}
