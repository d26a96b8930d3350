//! Promotion manifests read from files, as a platform team would
//! `kubectl apply` them: one file may hold several YAML documents separated
//! by `---`; a manifest without a namespace is in `default`. Directories are
//! read one level deep (so `examples/` leaves out `examples/invalid/`).
//! Each document is checked with the same rules as the CRD's schema.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use seckill_operator::admission::check_manifest;
use seckill_operator::promotion::PromotionSpec;
use seckill_workers::protocol::PromotionId;
use serde::Deserialize;

/// A valid promotion and where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Declared {
    pub id: PromotionId,
    pub spec: PromotionSpec,
    pub source: String,
}

/// A document that was refused, with every field and reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub source: String,
    pub problems: Vec<String>,
}

/// Everything the files declare right now.
#[derive(Debug, Default)]
pub struct Manifests {
    pub promotions: BTreeMap<PromotionId, Declared>,
    pub refused: Vec<Refused>,
}

/// What the files looked like (path, modification time, size), to notice
/// a changed, added or removed file without reading them all every time.
pub type Fingerprint = Vec<(PathBuf, Option<SystemTime>, u64)>;

fn is_manifest(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml" | "json")
    )
}

/// The manifest files named by `-f` arguments, sorted.
pub fn files(inputs: &[PathBuf]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for input in inputs {
        if input.is_dir() {
            if let Ok(entries) = std::fs::read_dir(input) {
                let mut found: Vec<PathBuf> = entries
                    .filter_map(Result::ok)
                    .map(|e| e.path())
                    .filter(|p| p.is_file() && is_manifest(p))
                    .collect();
                found.sort();
                out.extend(found);
            }
        } else {
            out.push(input.clone());
        }
    }
    out
}

pub fn fingerprint(inputs: &[PathBuf]) -> Fingerprint {
    files(inputs)
        .into_iter()
        .map(|p| {
            let meta = std::fs::metadata(&p).ok();
            let modified = meta.as_ref().and_then(|m| m.modified().ok());
            let len = meta.map(|m| m.len()).unwrap_or(0);
            (p, modified, len)
        })
        .collect()
}

/// Reads and checks every document of every file.
pub fn load(inputs: &[PathBuf]) -> Manifests {
    let mut manifests = Manifests::default();
    for path in files(inputs) {
        let shown = path.display().to_string();
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) => {
                manifests.refused.push(Refused {
                    source: shown,
                    problems: vec![format!("cannot read: {e}")],
                });
                continue;
            }
        };
        for (n, document) in serde_yaml::Deserializer::from_str(&text).enumerate() {
            let source = format!("{shown} (document {})", n + 1);
            let value = match serde_yaml::Value::deserialize(document) {
                Ok(serde_yaml::Value::Null) => continue,
                Ok(v) => v,
                Err(e) => {
                    manifests.refused.push(Refused {
                        source,
                        problems: vec![format!("not YAML: {e}")],
                    });
                    break;
                }
            };
            match declared(&value, &source) {
                Ok(d) => {
                    if let Some(first) = manifests.promotions.get(&d.id) {
                        manifests.refused.push(Refused {
                            source: d.source.clone(),
                            problems: vec![format!(
                                "{} is already declared in {}",
                                d.id, first.source
                            )],
                        });
                    } else {
                        manifests.promotions.insert(d.id.clone(), d);
                    }
                }
                Err(problems) => manifests.refused.push(Refused { source, problems }),
            }
        }
    }
    manifests
}

fn declared(value: &serde_yaml::Value, source: &str) -> Result<Declared, Vec<String>> {
    let mut json = serde_json::to_value(value).map_err(|e| vec![format!("not a manifest: {e}")])?;
    let namespace_missing = json
        .pointer("/metadata/namespace")
        .and_then(serde_json::Value::as_str)
        .is_none_or(str::is_empty);
    if namespace_missing {
        if let Some(meta) = json.get_mut("metadata").and_then(|m| m.as_object_mut()) {
            meta.insert("namespace".into(), "default".into());
        }
    }
    let promotion = check_manifest(&json)
        .map_err(|errors| errors.iter().map(ToString::to_string).collect::<Vec<_>>())?;
    let namespace = promotion
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".to_owned());
    let name = promotion.metadata.name.clone().unwrap_or_default();
    let id = PromotionId::new(&namespace, &name).map_err(|e| vec![format!("metadata: {e}")])?;
    Ok(Declared {
        id,
        spec: promotion.spec,
        source: source.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    const VALID: &str = "apiVersion: seckill.io/v1\nkind: Promotion\nmetadata:\n  name: a\nspec:\n  publishTime: \"2030-01-01T00:00:00Z\"\n  finishTime: \"2030-01-02T00:00:00Z\"\n  numberOfCoupons: 10\n  discount: 0.5\n";

    #[test]
    fn several_documents_per_file_and_default_namespace() {
        let dir = tempfile::tempdir().unwrap();
        let second = VALID.replace("name: a", "name: b\n  namespace: shop");
        write(dir.path(), "two.yaml", &format!("{VALID}---\n{second}"));
        let m = load(&[dir.path().to_path_buf()]);
        assert!(m.refused.is_empty(), "{:?}", m.refused);
        let ids: Vec<String> = m.promotions.keys().map(ToString::to_string).collect();
        assert_eq!(ids, ["default/a", "shop/b"]);
    }

    #[test]
    fn an_invalid_document_is_reported_with_its_field_and_the_valid_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let bad = VALID
            .replace("name: a", "name: bad")
            .replace("discount: 0.5", "discount: 1.5");
        write(dir.path(), "mixed.yaml", &format!("{VALID}---\n{bad}"));
        let m = load(&[dir.path().to_path_buf()]);
        assert_eq!(m.promotions.len(), 1);
        assert_eq!(m.refused.len(), 1);
        assert!(m.refused[0].source.contains("document 2"));
        assert!(
            m.refused[0]
                .problems
                .iter()
                .any(|p| p.contains("spec.discount")),
            "{:?}",
            m.refused[0].problems
        );
    }

    #[test]
    fn directories_are_read_one_level_deep() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a.yaml", VALID);
        std::fs::create_dir(dir.path().join("invalid")).unwrap();
        write(&dir.path().join("invalid"), "x.yaml", "kind: Nope\n");
        write(dir.path(), "notes.txt", "not a manifest");
        assert_eq!(files(&[dir.path().to_path_buf()]).len(), 1);
    }

    #[test]
    fn the_same_promotion_twice_is_refused_the_second_time() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a.yaml", VALID);
        write(dir.path(), "b.yaml", VALID);
        let m = load(&[dir.path().to_path_buf()]);
        assert_eq!(m.promotions.len(), 1);
        assert!(m.refused[0].problems[0].contains("already declared"));
    }
}
