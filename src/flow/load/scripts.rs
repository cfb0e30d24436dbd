//! `script:` flows and the `*.rhai` files of a set: compiling a named
//! script in the set's sandbox (imports resolved at load time), which
//! contact fields a script sets (for `check`), and warning about scripts
//! no flow uses. The sandbox itself is `flow::script`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::OnceLock;

use regex::Regex;

use crate::flow::model::{Diagnostic, ScriptFlow, Severity};
use crate::flow::script::ScriptError;
use crate::flow::yaml::Node;

use super::{Cx, ScriptEnv};

/// Warns about top-level scripts that no flow names and no used script
/// imports: probably a forgotten `script:` line.
pub(super) fn unused_scripts(env: &ScriptEnv, diags: &mut Vec<Diagnostic>) {
    static IMPORT: OnceLock<Option<Regex>> = OnceLock::new();
    let import = IMPORT.get_or_init(|| Regex::new(r#"\bimport\s+"([^"]+)""#).ok());
    let mut used = env.used.clone();
    let mut todo: Vec<String> = used.iter().cloned().collect();
    while let Some(name) = todo.pop() {
        let Some((_, text)) = env.sources.get(&name) else {
            continue;
        };
        for caps in import.iter().flat_map(|re| re.captures_iter(text)) {
            let module = &caps[1];
            let file = if module.ends_with(".rhai") {
                module.to_owned()
            } else {
                format!("{module}.rhai")
            };
            if env.sources.contains_key(&file) && used.insert(file.clone()) {
                todo.push(file);
            }
        }
    }
    for (name, (path, _)) in &env.sources {
        if !used.contains(name) {
            diags.push(Diagnostic {
                file: path.clone(),
                line: 0,
                column: 0,
                severity: Severity::Warning,
                message: format!(
                    "not used by any flow (name it with `script: {name}` in a flow file; \
                     put modules in a subdirectory such as lib/)"
                ),
            });
        }
    }
}

/// Contact fields a script sets with a literal name, following the modules
/// it imports (and theirs), or `None` when it may set fields `check` cannot
/// see: a computed field name, an import whose path is not a literal, or a
/// module not found among `modules` (every `*.rhai` file of the flows
/// directory by relative path). Reads the text only, so it answers for a
/// script that does not compile too.
fn script_contact_fields(source: &str, modules: &BTreeMap<String, String>) -> Option<Vec<String>> {
    static LITERAL: OnceLock<Option<Regex>> = OnceLock::new();
    static ANY: OnceLock<Option<Regex>> = OnceLock::new();
    static IMPORT: OnceLock<Option<Regex>> = OnceLock::new();
    static ANY_IMPORT: OnceLock<Option<Regex>> = OnceLock::new();
    let literal = LITERAL
        .get_or_init(|| Regex::new(r#"\bset_contact\s*\(\s*"([A-Za-z0-9_]+)"\s*,"#).ok())
        .as_ref()?;
    let any = ANY
        .get_or_init(|| Regex::new(r"\bset_contact\b").ok())
        .as_ref()?;
    let import = IMPORT
        .get_or_init(|| Regex::new(r#"\bimport\s+"([^"]+)""#).ok())
        .as_ref()?;
    let any_import = ANY_IMPORT
        .get_or_init(|| Regex::new(r"\bimport\b").ok())
        .as_ref()?;
    let mut fields = Vec::new();
    let mut seen = BTreeSet::new();
    let mut todo = vec![source];
    while let Some(text) = todo.pop() {
        let found: Vec<String> = literal
            .captures_iter(text)
            .map(|c| c[1].to_owned())
            .collect();
        if any.find_iter(text).count() != found.len() {
            return None;
        }
        fields.extend(found);
        let imports: Vec<&str> = import
            .captures_iter(text)
            .filter_map(|c| c.get(1).map(|m| m.as_str()))
            .collect();
        if any_import.find_iter(text).count() != imports.len() {
            return None;
        }
        for module in imports {
            let file = if module.ends_with(".rhai") {
                module.to_owned()
            } else {
                format!("{module}.rhai")
            };
            if seen.insert(file.clone()) {
                todo.push(modules.get(&file)?);
            }
        }
    }
    Some(fields)
}

impl Cx<'_> {
    /// A compile error in Rhai, located in its own file (a `.rhai` file,
    /// or this YAML file for an expression).
    pub(super) fn script_err(&mut self, e: &ScriptError) {
        let (line, column) = e.line_column().unwrap_or((0, 0));
        self.diags.push(Diagnostic {
            file: e.file().to_path_buf(),
            line,
            column,
            severity: Severity::Error,
            message: e.message(),
        });
    }

    /// `script: quiz.rhai`: compiles that top-level file of the flows
    /// directory. When that fails (the error is reported), the flow still
    /// gets a script without code, so `check` reports only that error and
    /// not, as well, "unknown flow" where the flow is named or "never set"
    /// for the contact fields its script sets.
    pub(super) fn script(&mut self, node: &Node) -> Option<ScriptFlow> {
        let name = self.text(node, "`script`")?;
        let plain =
            name.ends_with(".rhai") && !name.starts_with('.') && !name.contains(['/', '\\', ':']);
        if !plain {
            self.err(
                node.pos,
                format!("`script` names a .rhai file in the flows directory, like quiz.rhai, not `{name}`"),
            );
            return Some(ScriptFlow::broken(None));
        }
        self.env.used.insert(name.clone());
        let Some((path, text)) = self.env.sources.get(&name) else {
            self.err(
                node.pos,
                format!("script `{name}` not found in the flows directory"),
            );
            return Some(ScriptFlow::broken(None));
        };
        let compiled = self.env.sandbox.compile_script(path, text);
        let contact_fields = script_contact_fields(text, &self.env.modules);
        let script = match compiled {
            Ok(script) => {
                self.env.compiled = true;
                Some(script)
            }
            Err(e) => {
                self.script_err(&e);
                None
            }
        };
        Some(ScriptFlow {
            script,
            contact_fields,
        })
    }
}
