//! A throwaway PostgreSQL cluster from the installed server binaries.
//!
//! PostgreSQL refuses to run as root; when the tests run as root the cluster runs as the
//! `postgres` system user (through `runuser`) in a temp directory that user owns.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sqlx::Connection;

use crate::{HarnessError, free_port};

/// A running throwaway cluster; stopped and deleted on drop.
pub struct TempPostgres {
    bin: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    run_as: Option<String>,
    running: bool,
}

impl TempPostgres {
    /// initdb + start on a free port; trust auth on 127.0.0.1 only, fsync off.
    pub fn start() -> Result<Self, HarnessError> {
        let bin = server_bin_dir()?;
        let run_as = if effective_uid_is_root()? { Some("postgres".to_owned()) } else { None };
        let dir = tempfile::Builder::new().prefix("ep-pg-").tempdir().map_err(HarnessError::io("create temp dir"))?;
        if let Some(user) = &run_as {
            let (uid, gid) = user_ids(user)?;
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).map_err(HarnessError::io("chown temp dir"))?;
        }
        let mut pg = Self { bin, dir, port: 0, run_as, running: false };
        pg.initdb()?;
        // A port can be taken between probing and binding; try a few.
        let mut last = None;
        for _ in 0..5 {
            pg.port = free_port().map_err(HarnessError::io("find a free port"))?;
            match pg.start_server() {
                Ok(()) => return Ok(pg),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| HarnessError::Setup("postgres did not start".into())))
    }

    /// Port the server listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// URL of database `db` as the `postgres` superuser.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Creates a fresh database and returns its URL.
    pub async fn create_database(&self, db: &str) -> Result<String, HarnessError> {
        let mut conn = sqlx::PgConnection::connect(&self.url("postgres")).await?;
        // Identifiers cannot be bound; the name is quoted with embedded quotes doubled.
        let sql = format!("CREATE DATABASE \"{}\"", db.replace('"', "\"\""));
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(&mut conn).await?;
        conn.close().await?;
        Ok(self.url(db))
    }

    /// Stops the server (the data stays), e.g. to simulate an outage.
    pub fn stop(&mut self) -> Result<(), HarnessError> {
        if self.running {
            self.pg_ctl(&["stop", "-m", "fast", "-w"])?;
            self.running = false;
        }
        Ok(())
    }

    /// Starts the server again on the same port after [`Self::stop`].
    pub fn restart(&mut self) -> Result<(), HarnessError> {
        self.start_server()
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn initdb(&self) -> Result<(), HarnessError> {
        let data = self.data_dir();
        let out = self.run(
            "initdb",
            &["-D", path_str(&data)?, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync", "--no-instructions"],
        )?;
        check("initdb", &out)
    }

    fn start_server(&mut self) -> Result<(), HarnessError> {
        let data = self.data_dir();
        let log = data.join("server.log");
        let opts = format!(
            "-k {} -p {} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off \
             -c shared_preload_libraries=pg_stat_statements",
            path_str(self.dir.path())?,
            self.port
        );
        let out = self
            .run("pg_ctl", &["-D", path_str(&data)?, "-l", path_str(&log)?, "-w", "-t", "30", "-o", &opts, "start"])?;
        if !out.status.success() {
            let server_log = std::fs::read_to_string(&log).unwrap_or_default();
            return Err(HarnessError::Setup(format!(
                "pg_ctl start failed: {}{}\n{server_log}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        self.running = true;
        Ok(())
    }

    fn pg_ctl(&self, args: &[&str]) -> Result<(), HarnessError> {
        let data = self.data_dir();
        let mut all = vec!["-D", path_str(&data)?];
        all.extend_from_slice(args);
        let out = self.run("pg_ctl", &all)?;
        check("pg_ctl", &out)
    }

    fn run(&self, tool: &str, args: &[&str]) -> Result<Output, HarnessError> {
        let exe = self.bin.join(tool);
        let mut cmd = match &self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(&exe);
                c
            }
            None => Command::new(&exe),
        };
        cmd.args(args).current_dir(self.dir.path());
        cmd.output().map_err(HarnessError::io(format!("run {}", exe.display())))
    }
}

impl Drop for TempPostgres {
    fn drop(&mut self) {
        if self.running {
            let _ = self.pg_ctl(&["stop", "-m", "immediate", "-w"]);
        }
    }
}

fn check(what: &str, out: &Output) -> Result<(), HarnessError> {
    if out.status.success() {
        Ok(())
    } else {
        Err(HarnessError::Setup(format!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )))
    }
}

fn path_str(p: &Path) -> Result<&str, HarnessError> {
    p.to_str().ok_or_else(|| HarnessError::Setup(format!("path is not UTF-8: {}", p.display())))
}

/// Finds the server binaries: `$EP_PG_BIN`, the newest `/usr/lib/postgresql/*/bin`, or `pg_config --bindir`.
pub fn server_bin_dir() -> Result<PathBuf, HarnessError> {
    if let Some(dir) = std::env::var_os("EP_PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Ok(bin);
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        let bin = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if bin.join("initdb").exists() {
            return Ok(bin);
        }
    }
    Err(HarnessError::Setup(
        "PostgreSQL server binaries (initdb, pg_ctl) not found: run `make deps` or `apt-get install -y postgresql`, \
         or point EP_PG_BIN at their directory"
            .into(),
    ))
}

fn effective_uid_is_root() -> Result<bool, HarnessError> {
    // /proc/self belongs to the process's effective uid; this avoids unsafe libc calls.
    Ok(std::fs::metadata("/proc/self").map_err(HarnessError::io("stat /proc/self"))?.uid() == 0)
}

fn user_ids(user: &str) -> Result<(u32, u32), HarnessError> {
    let passwd = std::fs::read_to_string("/etc/passwd").map_err(HarnessError::io("read /etc/passwd"))?;
    passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() > 3 && f[0] == user)
        .and_then(|f| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
        .ok_or_else(|| {
            HarnessError::Setup(format!(
                "running as root, but there is no `{user}` user to run PostgreSQL as (installing the postgresql package creates it)"
            ))
        })
}
