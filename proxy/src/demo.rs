//! `agiproxy demo`: placeholder until the fake peers land.
pub async fn run(_listen: std::net::SocketAddr, _once: bool) -> anyhow::Result<()> {
    Ok(())
}
