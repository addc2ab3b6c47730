//! What a comparison found and what `pgtide verify` prints: the counts, the first keys of each
//! kind, the repair's figures, for people and as JSON.

use serde::Serialize;

use crate::config::Mode;

/// How many keys of each kind a report names.
pub const NAMED_KEYS: usize = 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Missing,
    Different,
    Extra,
}

/// The first keys of each kind, each key as its values' text (in `key` order).
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Keys {
    pub missing: Vec<Vec<String>>,
    pub different: Vec<Vec<String>>,
    pub extra: Vec<Vec<String>>,
}

/// What one comparison found.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Outcome {
    /// View rows the job has reached, compared with the target.
    pub compared: u64,
    /// In the view, not in the target.
    pub missing: u64,
    /// In both, with other values (or marked `_pgtide_deleted` in the target).
    pub different: u64,
    /// In the target, not in the view (counted for notify jobs that delete only).
    pub extra: u64,
    /// Up to `NAMED_KEYS` keys of each kind.
    pub keys: Keys,
}

impl Outcome {
    /// Nothing differs.
    pub fn clean(&self) -> bool {
        self.missing + self.different + self.extra == 0
    }

    pub(super) fn add(&mut self, kind: Kind, key: &[String]) {
        let (n, named) = match kind {
            Kind::Missing => (&mut self.missing, &mut self.keys.missing),
            Kind::Different => (&mut self.different, &mut self.keys.different),
            Kind::Extra => (&mut self.extra, &mut self.keys.extra),
        };
        *n += 1;
        if named.len() < NAMED_KEYS {
            named.push(key.to_vec());
        }
    }
}

/// What `--repair` found and wrote.
#[derive(Debug, Clone, Serialize)]
pub struct Repaired {
    /// The comparison before the repair.
    #[serde(flatten)]
    pub found: Outcome,
    /// Rows the DWH inserted or changed.
    pub written: u64,
    /// Target rows deleted or marked deleted.
    pub deleted: u64,
}

/// The result of `verify`: with `--repair`, `outcome` is the comparison after the repair.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub job: String,
    pub mode: &'static str,
    pub target: String,
    /// Whether rows extra in the target count: notify jobs with `on_delete` "delete" or "soft",
    /// over the whole view (a row that is not in the view has no cursor to lie in a range).
    pub extra_counted: bool,
    #[serde(flatten)]
    pub outcome: Outcome,
    pub repaired: Option<Repaired>,
    pub seconds: f64,
}

impl Report {
    /// Nothing differs (after the repair, with `--repair`).
    pub fn clean(&self) -> bool {
        self.outcome.clean()
    }

    /// A short report for people.
    pub fn human(&self) -> String {
        let mut out = String::new();
        if let Some(r) = &self.repaired {
            if r.found.clean() {
                out.push_str(&format!("job {}: nothing to repair\n", self.job));
            } else {
                out.push_str(&format!(
                    "job {}: repaired {} missing, {} different, {} extra ({} rows written, {} deleted)\n",
                    self.job, r.found.missing, r.found.different, r.found.extra, r.written, r.deleted
                ));
                out.push_str(&named_keys(&r.found));
            }
        }
        let o = &self.outcome;
        let scope = if self.repaired.as_ref().is_some_and(|r| !r.found.clean()) {
            "after the repair, "
        } else {
            ""
        };
        if o.clean() {
            out.push_str(&format!(
                "job {}: {scope}target {} matches the view ({} rows compared{})\n",
                self.job,
                self.target,
                o.compared,
                self.extra_note()
            ));
        } else {
            out.push_str(&format!(
                "job {}: {scope}target {} differs from the view: {} missing, {} different, {} extra ({} rows compared{})\n",
                self.job, self.target, o.missing, o.different, o.extra, o.compared, self.extra_note()
            ));
            out.push_str(&named_keys(o));
        }
        out
    }

    fn extra_note(&self) -> &'static str {
        if self.extra_counted {
            ""
        } else if self.mode == Mode::Poll.as_str() {
            "; extra rows are not counted for poll jobs"
        } else {
            "; extra rows are not counted for this job"
        }
    }
}

fn named_keys(o: &Outcome) -> String {
    let mut out = String::new();
    for (label, n, keys) in [
        ("missing", o.missing, &o.keys.missing),
        ("different", o.different, &o.keys.different),
        ("extra", o.extra, &o.keys.extra),
    ] {
        if keys.is_empty() {
            continue;
        }
        let shown: Vec<String> = keys
            .iter()
            .map(|k| match k.as_slice() {
                [one] => one.clone(),
                many => format!("({})", many.join(", ")),
            })
            .collect();
        let more = if n as usize > keys.len() { ", ..." } else { "" };
        out.push_str(&format!("  {label}: {}{more}\n", shown.join("; ")));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_name_at_most_ten_keys_of_each_kind() {
        let mut o = Outcome::default();
        for i in 0..25 {
            o.add(Kind::Missing, &[i.to_string()]);
        }
        o.add(Kind::Extra, &["a".into(), "b".into()]);
        assert_eq!(o.missing, 25);
        assert_eq!(o.keys.missing.len(), NAMED_KEYS);
        assert!(!o.clean());
        let text = named_keys(&o);
        assert!(text.contains("  missing: 0; 1; 2"), "{text}");
        assert!(text.contains("9, ..."), "{text}");
        assert!(text.contains("  extra: (a, b)\n"), "{text}");
    }
}
