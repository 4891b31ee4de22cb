//! `reach dashboard`: a one-time login URL for the node's live dashboard
//! (see `reach::api::dashboard`).

use anyhow::Result;
use reach::api::client::ApiClient;
use reach::api::dashboard::LoginCode;

/// Asks the node for a login code and prints the URL that uses it (the
/// URL on stdout alone, so scripts can take it; the note on stderr).
pub async fn login_url(client: &ApiClient) -> Result<()> {
    let code: LoginCode = client
        .post("/v1/dashboard/code", &serde_json::json!({}))
        .await?;
    println!(
        "http://{}/dashboard/login?code={}",
        client.addr(),
        code.code
    );
    eprintln!(
        "open this URL in a browser on this machine; it works once, within {} s",
        code.expires_in_s
    );
    Ok(())
}
