//! `/metrics` in mirror mode: each upstream's instance keeps its own
//! registry (its cache, index and access counts are its own), so the
//! exposition is theirs merged, every sample labelled `upstream="<name>"`,
//! and each family written once (a scraper refuses a family twice).

use std::collections::HashMap;

/// One family: its `# HELP`/`# TYPE` lines and its samples.
#[derive(Default)]
struct Family {
    meta: Vec<String>,
    samples: Vec<String>,
}

/// Merges the expositions of `parts` (`(upstream name, text)`).
pub(crate) fn merge(parts: &[(&str, String)]) -> String {
    let mut order: Vec<String> = Vec::new();
    let mut families: HashMap<String, Family> = HashMap::new();
    let mut eof = false;
    for (upstream, text) in parts {
        let mut current = String::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# ") {
                let mut words = rest.splitn(3, ' ');
                let (kind, name) = (words.next(), words.next());
                match (kind, name) {
                    (Some("EOF"), _) => eof = true,
                    (Some(kind), Some(name)) => {
                        current = name.to_string();
                        let family = families.entry(current.clone()).or_insert_with(|| {
                            order.push(current.clone());
                            Family::default()
                        });
                        let seen = family
                            .meta
                            .iter()
                            .any(|m| m.starts_with(&format!("# {kind} ")));
                        if !seen {
                            family.meta.push(line.to_string());
                        }
                    }
                    _ => {}
                }
            } else if !line.is_empty() {
                let family = families.entry(current.clone()).or_insert_with(|| {
                    order.push(current.clone());
                    Family::default()
                });
                family.samples.push(labelled(line, upstream));
            }
        }
    }
    let mut out = String::new();
    for name in &order {
        let family = &families[name];
        for line in family.meta.iter().chain(&family.samples) {
            out.push_str(line);
            out.push('\n');
        }
    }
    if eof {
        out.push_str("# EOF\n");
    }
    out
}

/// `name{a="b"} 1` as `name{upstream="x",a="b"} 1`.
fn labelled(sample: &str, upstream: &str) -> String {
    let label = format!("upstream=\"{upstream}\"");
    let name_end = sample.find(['{', ' ']).unwrap_or(sample.len());
    let (name, rest) = sample.split_at(name_end);
    match rest.strip_prefix('{') {
        Some(labels) if labels.starts_with('}') => format!("{name}{{{label}{labels}"),
        Some(labels) => format!("{name}{{{label},{labels}"),
        None => format!("{name}{{{label}}}{rest}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_are_written_once_with_every_upstream_s_samples() {
        let a = "# HELP graft_cache_hits Hits.\n# TYPE graft_cache_hits counter\ngraft_cache_hits_total 3\n\
                 # HELP graft_requests Requests.\n# TYPE graft_requests counter\ngraft_requests_total{route=\"blob\",status=\"200\"} 1\n# EOF\n";
        let b = "# HELP graft_cache_hits Hits.\n# TYPE graft_cache_hits counter\ngraft_cache_hits_total 5\n# EOF\n";
        let merged = merge(&[("a.io", a.into()), ("b.io", b.into())]);
        assert_eq!(
            merged,
            "# HELP graft_cache_hits Hits.\n# TYPE graft_cache_hits counter\n\
             graft_cache_hits_total{upstream=\"a.io\"} 3\ngraft_cache_hits_total{upstream=\"b.io\"} 5\n\
             # HELP graft_requests Requests.\n# TYPE graft_requests counter\n\
             graft_requests_total{upstream=\"a.io\",route=\"blob\",status=\"200\"} 1\n# EOF\n"
        );
    }
}
