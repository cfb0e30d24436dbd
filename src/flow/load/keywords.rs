//! Keyword files: `keywords:` (a phrase and its reply or flow), `default:`
//! and `to:` (see "Keyword files" in flows/README.md).

use crate::flow::matcher::phrase_words;
use crate::flow::model::{DefaultReply, KeywordRule, Origin};
use crate::flow::yaml::{Kind, Node};

use super::{Cx, Doc};

impl Cx<'_> {
    pub(super) fn keyword_file(&mut self, root: &Node) -> Option<Doc> {
        let m = self.map(
            root,
            "a keyword file",
            &["keywords", "default", "to", "description"],
        )?;
        let scope = m.get("to").map(|(_, v)| self.scope(v)).unwrap_or_default();
        let mut keywords = Vec::new();
        if let Some((_, kws)) = m.get("keywords") {
            if let Some(entries) = self.map(kws, "`keywords`", &[]) {
                for (key, (k, v)) in entries {
                    let words = phrase_words(key);
                    if words.is_empty() {
                        self.err(
                            k.pos,
                            format!("keyword `{key}` is empty after normalisation"),
                        );
                        continue;
                    }
                    let (say, flow) = match &v.kind {
                        Kind::Map(_) => {
                            let Some(vm) =
                                self.map(v, "a keyword reply", &["say", "media", "flow"])
                            else {
                                continue;
                            };
                            let say = self.say_with_media(
                                vm.get("say"),
                                vm.get("media"),
                                "a keyword reply",
                            );
                            let flow = vm
                                .get("flow")
                                .and_then(|(_, f)| self.step_name(f, "`flow`"));
                            if say.is_empty() && flow.is_none() {
                                self.err(v.pos, "a keyword needs `say`, `media` or `flow`");
                                continue;
                            }
                            (say, flow)
                        }
                        _ => (self.messages(v, "a keyword reply"), None),
                    };
                    keywords.push(KeywordRule {
                        words,
                        first_word: false,
                        say,
                        flow,
                        scope: scope.clone(),
                        origin: Origin {
                            file: self.file.clone(),
                            pos: k.pos,
                        },
                        display: key.to_owned(),
                    });
                }
            }
        }
        let default = m.get("default").map(|(k, v)| DefaultReply {
            say: self.messages(v, "`default`"),
            scope: scope.clone(),
            origin: Origin {
                file: self.file.clone(),
                pos: k.pos,
            },
        });
        Some(Doc::Keywords { keywords, default })
    }
}
