//! The project's one HTTP client (ureq): health checks of the launcher and the load
//! generator's keep-alive connections.

use std::net::SocketAddr;
use std::time::Duration;

/// An agent that answers every status as a response (4xx/5xx are results here, not
/// errors) and gives up after `timeout`.
pub(crate) fn agent(timeout: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        .http_status_as_error(false)
        .build()
        .into()
}

/// GET `path` from `addr`: the status code and the body.
pub(crate) fn get(addr: SocketAddr, path: &str) -> Result<(u16, String), ureq::Error> {
    let mut response = agent(Duration::from_millis(500))
        .get(&format!("http://{addr}{path}"))
        .call()?;
    let status = response.status().as_u16();
    let body = response.body_mut().read_to_string()?;
    Ok((status, body))
}

/// POST a JSON body with `agent` (which keeps the connection alive): the status code.
pub(crate) fn post(agent: &ureq::Agent, url: &str, body: &str) -> Result<u16, ureq::Error> {
    let mut response = agent
        .post(url)
        .header("content-type", "application/json")
        .send(body)?;
    let status = response.status().as_u16();
    // Read the body so the connection can be reused.
    let _ = response.body_mut().read_to_vec()?;
    Ok(status)
}

/// POST a JSON body with `agent`: the status code and the answer's bytes.
pub(crate) fn post_body(
    agent: &ureq::Agent,
    url: &str,
    body: &str,
) -> Result<(u16, Vec<u8>), ureq::Error> {
    let mut response = agent
        .post(url)
        .header("content-type", "application/json")
        .send(body)?;
    let status = response.status().as_u16();
    let bytes = response
        .body_mut()
        .with_config()
        .limit(64 << 20)
        .read_to_vec()?;
    Ok((status, bytes))
}
