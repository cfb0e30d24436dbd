//! Rhai in YAML flows: [`Expr`] (a compiled `when:` condition or `{{= }}`
//! expression, positioned in its YAML file), the [`ExprContext`] it sees,
//! and the sandbox's `compile_expr`, `eval_bool` and `eval_string`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;

use rhai::{Dynamic, EvalAltResult, Scope, AST};

use super::errors::{parse_error, runtime_error, Origin, ScriptError};
use super::run::{catch_engine_panic, RunGuard, RunState};
use super::values::strings_to_map;
use super::Sandbox;

/// A compiled expression embedded in a YAML flow, with the position it
/// starts at so errors point into the YAML file.
#[derive(Clone)]
pub struct Expr {
    ast: Arc<AST>,
    origin: Origin,
}

impl Expr {
    /// The YAML file the expression came from.
    pub fn file(&self) -> &Path {
        &self.origin.file
    }

    /// Where the expression starts in that file (1-based line, column).
    pub fn line_column(&self) -> (usize, usize) {
        (self.origin.line, self.origin.column)
    }

    /// The same compiled expression, written again at `line`:`column` of
    /// the same file (a YAML alias of it): it shares the compiled code, and
    /// its errors point at the new place.
    pub fn relocated(&self, line: usize, column: usize) -> Expr {
        let (line, column) = (line.max(1), column.max(1));
        Expr {
            ast: self.ast.clone(),
            origin: Origin {
                file: self.origin.file.clone(),
                line,
                column,
                fallback: (line, column),
            },
        }
    }
}

impl fmt::Debug for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Expr")
            .field("file", &self.origin.file)
            .field("line", &self.origin.line)
            .field("column", &self.origin.column)
            .finish()
    }
}

/// What a YAML expression can see. In the expression these are the
/// variables `body`, `from`, `to`, `sid`, `vars` and `contact` (maps of
/// strings); `now` is available as `now()`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExprContext {
    pub body: String,
    pub from: String,
    pub to: String,
    pub message_sid: String,
    /// Unix seconds, from the flow engine's clock.
    pub now: i64,
    pub vars: BTreeMap<String, String>,
    pub contact: BTreeMap<String, String>,
}

/// The variables a YAML expression sees. Pushed as plain (not constant)
/// variables so the optimizer cannot fold the empty compile-time values in.
fn expr_scope(ctx: &ExprContext) -> Scope<'static> {
    let mut scope = Scope::new();
    scope.push("body", ctx.body.clone());
    scope.push("from", ctx.from.clone());
    scope.push("to", ctx.to.clone());
    scope.push("sid", ctx.message_sid.clone());
    scope.push("vars", strings_to_map(&ctx.vars));
    scope.push("contact", strings_to_map(&ctx.contact));
    scope
}

impl Sandbox {
    /// Compiles an expression that sits in a YAML file at `line`:`column`
    /// (1-based, where the expression text starts). Error positions are
    /// translated into that file: on the expression's first line columns are
    /// offset by `column`; later lines keep their own column, because the
    /// loader cannot know how the YAML scalar was indented.
    pub fn compile_expr(
        &self,
        file: &Path,
        line: usize,
        column: usize,
        source: &str,
    ) -> Result<Expr, ScriptError> {
        let (line, column) = (line.max(1), column.max(1));
        let origin = Origin {
            file: Arc::from(file),
            line,
            column,
            fallback: (line, column),
        };
        let mut ast = self
            .engine
            .compile_expression_with_scope(&expr_scope(&ExprContext::default()), source)
            .map_err(|err| parse_error(&origin, err))?;
        ast.set_source(file.to_string_lossy().as_ref());
        self.compile_patterns(&ast, &origin)?;
        Ok(Expr {
            ast: Arc::new(ast),
            origin,
        })
    }

    /// Evaluates a branch condition. `()` (e.g. an unset `vars.x`) counts as
    /// false; any other non-bool is a runtime error.
    pub fn eval_bool(&self, expr: &Expr, ctx: &ExprContext) -> Result<bool, ScriptError> {
        let value = self.eval_expr(expr, ctx)?;
        if value.is_unit() {
            return Ok(false);
        }
        value.as_bool().map_err(|_| ScriptError::Runtime {
            file: expr.origin.file.to_path_buf(),
            line: expr.origin.line,
            column: expr.origin.column,
            message: format!("condition must be true or false, not {}", value.type_name()),
        })
    }

    /// Evaluates an expression to text: strings as they are, `()` as "",
    /// anything else as Rhai prints it.
    pub fn eval_string(&self, expr: &Expr, ctx: &ExprContext) -> Result<String, ScriptError> {
        let value = self.eval_expr(expr, ctx)?;
        Ok(if value.is_unit() {
            String::new()
        } else {
            value.to_string()
        })
    }

    fn eval_expr(&self, expr: &Expr, ctx: &ExprContext) -> Result<Dynamic, ScriptError> {
        let mut scope = expr_scope(ctx);
        let _run = RunGuard::enter(RunState::new(
            &self.limits,
            ctx.now,
            &ctx.message_sid,
            expr.origin.file.clone(),
        ));
        match catch_engine_panic(|| {
            self.engine
                .eval_ast_with_scope::<Dynamic>(&mut scope, &expr.ast)
        }) {
            Ok(value) => Ok(value.flatten()),
            Err(err) => match *err {
                EvalAltResult::Exit(value, _) => Ok(value.flatten()),
                err => Err(runtime_error(&expr.origin, err)),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::script::testing::*;

    #[test]
    fn expression_errors_are_offset_into_the_yaml_file() {
        let sandbox = sandbox();
        let yaml = Path::new("flows/signup.yaml");
        // Syntax error on the expression's first line: the column is shifted.
        let err = sandbox.compile_expr(yaml, 12, 15, "body == ").unwrap_err();
        assert_eq!(err.file(), yaml);
        assert_eq!(err.line_column(), Some((12, 15 + 8)), "{err}");
        assert!(
            err.to_string()
                .starts_with("flows/signup.yaml:12:23: error: "),
            "{err}"
        );

        // On a later line, only the line is shifted.
        let err = sandbox
            .compile_expr(yaml, 12, 15, "body == \"a\" ||\n  nope")
            .unwrap_err();
        assert_eq!(err.line_column(), Some((13, 3)), "{err}");

        // Runtime errors are translated the same way.
        let expr = sandbox
            .compile_expr(yaml, 30, 11, "vars.name + 1 > (1 / 0)")
            .unwrap();
        let err = sandbox.eval_bool(&expr, &ctx("x")).unwrap_err();
        assert!(matches!(err, ScriptError::Runtime { .. }), "{err}");
        assert_eq!(err.line_column().map(|(l, _)| l), Some(30), "{err}");
        assert!(err.line_column().unwrap().1 > 11, "{err}");
    }

    #[test]
    fn expressions_see_the_message_vars_and_contact() {
        let sandbox = sandbox();
        let yaml = Path::new("flows/a.yaml");
        let cond = |src: &str, body: &str| {
            let expr = sandbox
                .compile_expr(yaml, 1, 1, src)
                .unwrap_or_else(|e| panic!("{e}"));
            sandbox
                .eval_bool(&expr, &ctx(body))
                .unwrap_or_else(|e| panic!("{e}"))
        };
        assert!(cond(
            r#"normalize(body) == "yes please""#,
            "  YES   please!! "
        ));
        assert!(cond(r#"matches(body, "(?i)^hours?$")"#, "Hours"));
        assert!(!cond(r#"matches(body, "(?i)^hours?$")"#, "hours please"));
        assert!(cond("parse_number(body) >= 18", "I am 21"));
        assert!(cond(r#"vars.name == "Ann" && contact.city == "Lyon""#, ""));
        assert!(cond(
            r#"from.starts_with("+1") && to != from && sid == "SM0001""#,
            ""
        ));
        // An unset variable is () and counts as false.
        assert!(!cond("vars.missing", ""));

        let expr = sandbox.compile_expr(yaml, 1, 1, "body.len()").unwrap();
        let err = sandbox.eval_bool(&expr, &ctx("abc")).unwrap_err();
        assert!(err.to_string().contains("true or false"), "{err}");

        let text = |src: &str| {
            let expr = sandbox
                .compile_expr(yaml, 1, 1, src)
                .unwrap_or_else(|e| panic!("{e}"));
            sandbox
                .eval_string(&expr, &ctx("Ann"))
                .unwrap_or_else(|e| panic!("{e}"))
        };
        assert_eq!(text("`Hi ${vars.name}!`"), "Hi Ann!");
        assert_eq!(text("40 + 2"), "42");
        assert_eq!(text("vars.missing"), "");
        assert_eq!(text(r#"contact.name ?? "friend""#), "friend");
        assert_eq!(text("date(now())"), "1970-01-01");
        let captured = text(r#"captures("order 12-34", "([0-9]+)-([0-9]+)")[2]"#);
        assert_eq!(captured, "34");
        assert_eq!(text(r#"captures("nothing", "[0-9]+")"#), "");

        // Contact writes belong to scripts.
        let expr = sandbox
            .compile_expr(yaml, 1, 1, r#"set_contact("a", "b")"#)
            .unwrap();
        assert!(sandbox.eval_string(&expr, &ctx("")).is_err());
    }
}
