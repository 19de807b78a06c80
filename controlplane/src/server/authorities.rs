//! The cluster's CAs in the forms the standard tools take: a `TrustedUserCAKeys` line for sshd,
//! an `@cert-authority` line for `known_hosts`, the X.509 CA as PEM.

use tonic::Status;

use super::call::{Call, Done, Failure};
use crate::proto;

pub(super) async fn export(
    call: Call,
    r: proto::ExportAuthoritiesRequest,
) -> Result<Done<proto::ExportAuthoritiesResponse>, Failure> {
    let state = &call.state;
    let cluster = &state.cluster;
    let text = match r.r#type.as_str() {
        // One line for sshd's TrustedUserCAKeys file.
        "user" => format!("{} {cluster} user CA\n", state.user_ca.public_line()),
        // known_hosts: trust host certs for any host of the cluster.
        "host" => format!(
            "@cert-authority * {} {cluster} host CA\n",
            state.host_ca.public_line()
        ),
        "tls" => state.tls_ca.cert_pem().to_owned(),
        other => {
            return Err(Status::invalid_argument(format!(
                "type: unknown CA type `{other}`; expected user, host or tls"
            ))
            .into());
        }
    };
    Ok(Done::read(proto::ExportAuthoritiesResponse { text }))
}
