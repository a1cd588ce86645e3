//! Databases on a local server.

use super::PgServer;
use shard_agent::tls::ConnectError;

/// Creates database `name` on `server` if it does not exist.
pub async fn create_database(server: &PgServer, name: &str) -> Result<(), ConnectError> {
    let (client, connection) = shard_agent::tls::connect(&server.dsn("postgres")).await?;
    tokio::spawn(connection);
    let exists = client
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
        .await?
        .is_some();
    if !exists {
        // Callers pass our own identifiers; CREATE DATABASE takes no parameters.
        client
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await?;
    }
    Ok(())
}
