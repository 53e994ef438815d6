//! Preserve rules: which paths of the old root are carried into the new one,
//! and how (missing source, symlinks, who wins, merge or replace).
//!
//! Rules come from the device's config (`[preserve] paths` as shorthand and
//! `[[preserve.rule]]` tables) and from the image itself
//! ([`IMAGE_RULES`] in the new root: the image knows its own layout best).

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::path::PathBuf;

/// The image's own rules, a file inside the new root.
pub const IMAGE_RULES: &str = "usr/lib/abup/preserve.toml";

/// What to do when the old root has nothing at the rule's path.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Missing {
    /// Skip it and say so in the report.
    #[default]
    Skip,
    /// Fail the install before the flip.
    Error,
}

/// What to do with a symlink in the old root.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Symlinks {
    /// Copy the symlink itself.
    #[default]
    Keep,
    /// Copy what it points to (which must be inside the old root).
    Resolve,
}

/// Whose copy stays when both the image and the device have the path.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Wins {
    #[default]
    Device,
    Image,
}

/// How a directory present in both is combined.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DirMode {
    /// Entries are combined; the image's entries the device lacks stay.
    #[default]
    Merge,
    /// The device's directory replaces the image's as a whole.
    Replace,
}

/// Where a rule came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    Config,
    Image,
}

/// One validated rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// Absolute, without `..`, not `/`; may hold glob patterns (`*`, `?`, `[…]`).
    pub path: PathBuf,
    pub missing: Missing,
    pub symlinks: Symlinks,
    pub wins: Wins,
    pub directory: DirMode,
    pub origin: Origin,
}

/// A rule as written in TOML.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRule {
    pub path: PathBuf,
    #[serde(default)]
    pub missing: Missing,
    #[serde(default)]
    pub symlinks: Symlinks,
    #[serde(default)]
    pub wins: Wins,
    #[serde(default)]
    pub directory: DirMode,
}

impl RawRule {
    /// `preserve.paths` entries: a rule with every default.
    pub fn shorthand(path: PathBuf) -> RawRule {
        RawRule {
            path,
            missing: Missing::default(),
            symlinks: Symlinks::default(),
            wins: Wins::default(),
            directory: DirMode::default(),
        }
    }

    /// Validates the rule; `key` names where it was written.
    pub fn validate(self, key: &str, origin: Origin) -> Result<Rule> {
        let p = &self.path;
        if !p.is_absolute() {
            bail!("{key}: {} must be an absolute path", p.display());
        }
        let names = super::tree::names(p).with_context(|| key.to_string())?;
        if names.is_empty() {
            bail!("{key}: {} would replace the whole new root", p.display());
        }
        for n in &names {
            let n = n.to_string_lossy();
            if is_pattern(&n) {
                glob::Pattern::new(&n)
                    .with_context(|| format!("{key}: {} is not a valid glob", p.display()))?;
            }
        }
        Ok(Rule {
            path: self.path,
            missing: self.missing,
            symlinks: self.symlinks,
            wins: self.wins,
            directory: self.directory,
            origin,
        })
    }
}

/// Whether a path name holds glob syntax.
pub fn is_pattern(name: &str) -> bool {
    name.contains(['*', '?', '['])
}

/// Parses the image's rules file ([`IMAGE_RULES`]): `[[rule]]` tables.
pub fn parse_image_rules(text: &str) -> Result<Vec<Rule>> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct File {
        #[serde(default)]
        rule: Vec<RawRule>,
    }
    let f: File = toml::from_str(text)
        .map_err(|e| anyhow::anyhow!("{}", e.to_string().trim().replace('\n', " ")))?;
    f.rule
        .into_iter()
        .map(|r| r.validate("rule", Origin::Image))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_rules_parse_and_validate() {
        let rules = parse_image_rules(
            r#"
[[rule]]
path = "/etc/ssh/ssh_host_*"
missing = "error"
[[rule]]
path = "/etc/NetworkManager/system-connections"
wins = "image"
directory = "replace"
symlinks = "resolve"
"#,
        )
        .unwrap();
        assert_eq!(rules.len(), 2);
        assert_eq!(rules[0].missing, Missing::Error);
        assert_eq!(rules[0].directory, DirMode::Merge);
        assert_eq!(rules[1].wins, Wins::Image);
        assert_eq!(rules[1].symlinks, Symlinks::Resolve);
        assert_eq!(rules[1].origin, Origin::Image);
    }

    #[test]
    fn bad_rules_are_refused() {
        for (text, want) in [
            ("[[rule]]\npath = \"/etc/../shadow\"", "'..'"),
            ("[[rule]]\npath = \"etc/x\"", "absolute"),
            ("[[rule]]\npath = \"/\"", "whole new root"),
            ("[[rule]]\npath = \"/etc/[x\"", "glob"),
            (
                "[[rule]]\npath = \"/x\"\nwins = \"both\"",
                "unknown variant",
            ),
            ("[[rule]]\npath = \"/x\"\nfollow = true", "unknown field"),
        ] {
            let err = format!("{:#}", parse_image_rules(text).unwrap_err());
            assert!(err.contains(want), "{want:?} not in {err:?}");
        }
    }
}
