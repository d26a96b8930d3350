//! The CustomResourceDefinition, generated from the Rust types in
//! [`crate::promotion`]. `seckill-operator crd` prints it; the committed
//! `crds/promotions.seckill.io.yaml` (and the Helm chart's copy) must equal
//! it byte for byte, which a test checks.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

use crate::promotion::Promotion;
use crate::Error;

/// The CRD object.
pub fn crd() -> CustomResourceDefinition {
    Promotion::crd()
}

/// The CRD as the YAML document `seckill-operator crd` prints.
pub fn crd_yaml() -> Result<String, Error> {
    serde_yaml::to_string(&crd()).map_err(Error::Yaml)
}
