//! Imports: `import "name"` resolves to `<flows dir>/name.rhai` and to
//! nothing outside the flows directory; an import whose path is computed
//! is refused when the flows load. Modules are read only while compiling.

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use rhai::module_resolvers::FileModuleResolver;
use rhai::{Engine, EvalAltResult, ModuleResolver, Position, AST};

use super::run::with_run;

/// Resolves `import "name"` to `<flows dir>/name.rhai` and refuses anything
/// that could reach outside the flows directory: absolute paths, `..`,
/// drive prefixes, and symlinks that lead elsewhere.
pub(super) struct FlowsDirResolver {
    /// Canonical flows directory, compared against canonical module paths.
    root: Option<PathBuf>,
    /// Does the loading; caching is off so a reload sees edited modules.
    files: Option<FileModuleResolver>,
}

impl FlowsDirResolver {
    pub(super) fn new(module_dir: Option<&Path>) -> FlowsDirResolver {
        match module_dir {
            None => FlowsDirResolver {
                root: None,
                files: None,
            },
            Some(dir) => {
                let root = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
                let mut files = FileModuleResolver::new_with_path(root.clone());
                files.enable_cache(false);
                FlowsDirResolver {
                    root: Some(root),
                    files: Some(files),
                }
            }
        }
    }

    fn check(&self, path: &str, pos: Position) -> Result<&FileModuleResolver, Box<EvalAltResult>> {
        let refuse = |reason: &str| {
            Box::new(EvalAltResult::ErrorInModule(
                path.to_string(),
                Box::new(EvalAltResult::ErrorRuntime(reason.into(), pos)),
                pos,
            ))
        };
        let (Some(root), Some(files)) = (&self.root, &self.files) else {
            return Err(refuse("imports are disabled (no flows directory)"));
        };
        // Loading embeds every module a script imports; a module asked for
        // while a message is handled came from a path `check` never saw.
        if with_run(|run| !run.loading).unwrap_or(false) {
            return Err(refuse("modules are only read when the flows load"));
        }
        let relative = Path::new(path);
        let stays_inside = !path.is_empty()
            && !path.contains(['\\', ':', '\0'])
            && relative
                .components()
                .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
        if !stays_inside {
            return Err(refuse(
                "module paths must be relative to the flows directory, without '..'",
            ));
        }
        let full = files.get_file_path(path, None);
        match full.canonicalize() {
            Ok(real) if real.starts_with(root) => Ok(files),
            Ok(_) => Err(refuse("module resolves outside the flows directory")),
            Err(_) => Err(Box::new(EvalAltResult::ErrorModuleNotFound(
                path.to_string(),
                pos,
            ))),
        }
    }
}

impl ModuleResolver for FlowsDirResolver {
    fn resolve(
        &self,
        engine: &Engine,
        _source: Option<&str>,
        path: &str,
        pos: Position,
    ) -> Result<Arc<rhai::Module>, Box<EvalAltResult>> {
        self.check(path, pos)?.resolve(engine, None, path, pos)
    }

    fn resolve_ast(
        &self,
        engine: &Engine,
        _source: Option<&str>,
        path: &str,
        pos: Position,
    ) -> Option<Result<AST, Box<EvalAltResult>>> {
        let files = match self.check(path, pos) {
            Ok(files) => files,
            Err(err) => return Some(Err(err)),
        };
        let ast = files.resolve_ast(engine, None, path, pos)?;
        Some(ast.and_then(|ast| match computed_import(&ast) {
            None => Ok(ast),
            Some(at) => {
                let (line, column) = (at.line().unwrap_or(0), at.position().unwrap_or(0));
                Err(Box::new(EvalAltResult::ErrorInModule(
                    path.to_string(),
                    Box::new(EvalAltResult::ErrorRuntime(
                        format!("line {line}, column {column}: {COMPUTED_IMPORT}").into(),
                        pos,
                    )),
                    pos,
                )))
            }
        }))
    }
}

/// Why an `import` with a computed path is refused.
pub(super) const COMPUTED_IMPORT: &str =
    "an import path must be text in quotes, like import \"lib/util\" as util; \
     a computed path cannot be checked when the flows load";

/// Where the first `import` whose path is not written as text in quotes is,
/// if there is one (function bodies included). Such a path is only known
/// while a message is handled: too late to check it, or to read a module.
pub(super) fn computed_import(ast: &AST) -> Option<Position> {
    use rhai::{ASTNode, Expr as Node, Stmt};
    let mut found = None;
    ast.walk(&mut |path: &[ASTNode]| match path.last() {
        Some(ASTNode::Stmt(Stmt::Import(import, _)))
            if !matches!(import.0, Node::StringConstant(..)) =>
        {
            found = Some(import.0.position());
            false
        }
        _ => true,
    });
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::script::testing::*;
    use crate::flow::script::{Limits, Sandbox, ScriptError};
    use std::collections::BTreeMap;

    fn flows_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("greet.rhai"),
            "fn hello(name) { `hello ${name}` }\n",
        )
        .unwrap();
        std::fs::create_dir(dir.path().join("lib")).unwrap();
        std::fs::write(dir.path().join("lib/math.rhai"), "fn double(x) { x * 2 }\n").unwrap();
        dir
    }

    #[test]
    fn imports_from_the_flows_directory_work() {
        let dir = flows_dir();
        let sandbox = Sandbox::new(Limits::default(), Some(dir.path()));
        let source = format!(
            "import \"greet\" as greet;\nimport \"lib/math\" as math;\n{}",
            on_message("greet::hello(msg.body) + \" \" + math::double(21)")
        );
        let script = sandbox
            .compile_script(&dir.path().join("main.rhai"), &source)
            .unwrap_or_else(|err| panic!("{err}"));
        // The module was embedded at compile time: deleting it changes nothing.
        std::fs::remove_file(dir.path().join("greet.rhai")).unwrap();
        let out = sandbox
            .run_script(&script, &input("Ann"), &BTreeMap::new())
            .unwrap();
        assert_eq!(bodies(&out), ["hello Ann 42"]);
    }

    #[test]
    fn imports_outside_the_flows_directory_are_rejected() {
        let dir = flows_dir();
        let sandbox = Sandbox::new(Limits::default(), Some(dir.path()));
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret.rhai"), "fn secret() { 1 }\n").unwrap();
        let absolute = outside.path().join("secret");

        for path in [
            "../etc/passwd".to_string(),
            "lib/../../secret".to_string(),
            "/etc/passwd".to_string(),
            absolute.to_string_lossy().into_owned(),
            "missing".to_string(),
        ] {
            let source = format!("// header\nimport \"{path}\" as m;\n{}", on_message("()"));
            match sandbox.compile_script(Path::new("flows/main.rhai"), &source) {
                Err(err @ ScriptError::Compile { .. }) => {
                    assert_eq!(err.line_column(), Some((2, 8)), "{path}: {err}");
                    assert!(err.to_string().contains(&path), "{err}");
                }
                other => panic!("{path}: expected a compile error, got {other:?}"),
            }
        }

        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(
                outside.path().join("secret.rhai"),
                dir.path().join("sneaky.rhai"),
            )
            .unwrap();
            let source = format!("import \"sneaky\" as m;\n{}", on_message("()"));
            let err = sandbox
                .compile_script(Path::new("flows/main.rhai"), &source)
                .unwrap_err();
            assert!(
                err.to_string().contains("outside the flows directory"),
                "{err}"
            );
        }

        // No flows directory, no imports at all.
        let source = format!("import \"greet\" as m;\n{}", on_message("()"));
        let err = Sandbox::new(Limits::default(), None)
            .compile_script(Path::new("flows/main.rhai"), &source)
            .unwrap_err();
        assert!(err.to_string().contains("imports are disabled"), "{err}");
    }

    #[test]
    fn computed_imports_are_refused_when_the_flows_load() {
        let dir = flows_dir();
        let sandbox = Sandbox::new(Limits::default(), Some(dir.path()));
        let compile = |source: &str| sandbox.compile_script(&dir.path().join("main.rhai"), source);
        // A path only known while a message is handled could name any file
        // then, and would be read then: refused where it is written.
        let source = format!(
            "let name = \"greet\";\nimport name as g;\n{}",
            on_message("g::hello(msg.body)")
        );
        let err = compile(&source).unwrap_err();
        assert!(matches!(err, ScriptError::Compile { .. }), "{err}");
        assert_eq!(err.line_column(), Some((2, 8)), "{err}");
        assert!(err.to_string().contains("text in quotes"), "{err}");
        // Inside a function, too.
        let source = format!(
            "fn load(p) {{\n  import p as m;\n  m::hello(\"x\")\n}}\n{}",
            on_message("load(msg.body)")
        );
        let err = compile(&source).unwrap_err();
        assert_eq!(err.line_column(), Some((2, 10)), "{err}");
        // And in a module, reported at the import of that module.
        std::fs::write(
            dir.path().join("lib/dynamic.rhai"),
            "fn load(p) {\n  import \"lib/\" + p as m;\n  m::double(1)\n}\n",
        )
        .unwrap();
        let source = format!(
            "import \"lib/dynamic\" as d;\n{}",
            on_message("d::load(msg.body)")
        );
        let err = compile(&source).unwrap_err();
        assert_eq!(err.line_column(), Some((1, 8)), "{err}");
        let shown = err.to_string();
        assert!(
            shown.contains("lib/dynamic") && shown.contains("line 2"),
            "{shown}"
        );
        // A path in quotes is fine, anywhere.
        let source = format!(
            "fn load() {{\n  import \"greet\" as g;\n  g::hello(\"x\")\n}}\n{}",
            on_message("load()")
        );
        let script = compile(&source).unwrap_or_else(|err| panic!("{err}"));
        let out = sandbox
            .run_script(&script, &input("hi"), &BTreeMap::new())
            .unwrap();
        assert_eq!(bodies(&out), ["hello x"]);
    }
}
