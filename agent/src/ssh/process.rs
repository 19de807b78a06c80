//! Who a session runs as, and the command line that starts it.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// The system account a session runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LoginUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
    pub shell: PathBuf,
    /// The agent is root and the login is another account: drop privileges in the child.
    pub switch: bool,
    /// The file-creation mask the session starts with (see [`login_umask`]).
    pub umask: u32,
}

/// Look `login` up in the system user database and check the agent can start processes as it.
/// Blocking (NSS): call it on a blocking thread.
pub(crate) fn resolve_login(login: &str) -> Result<LoginUser, String> {
    let user = match nix::unistd::User::from_name(login) {
        Ok(Some(u)) => u,
        Ok(None) => return Err(format!("login user `{login}` does not exist on this host")),
        Err(e) => return Err(format!("could not look up login user `{login}`: {e}")),
    };
    let euid = nix::unistd::geteuid();
    let switch = if euid.is_root() {
        !user.uid.is_root()
    } else if user.uid == euid {
        false
    } else {
        return Err(format!(
            "the agent is not running as root (uid {euid}) and can only start sessions as its \
             own user, not as `{login}`"
        ));
    };
    let group = nix::unistd::Group::from_gid(user.gid).ok().flatten();
    let login_defs = std::fs::read_to_string("/etc/login.defs").unwrap_or_default();
    let umask = login_umask(
        &login_defs,
        &user.name,
        user.uid.as_raw(),
        user.gid.as_raw(),
        group.as_ref().map(|g| g.name.as_str()),
    );
    Ok(LoginUser {
        name: user.name,
        uid: user.uid.as_raw(),
        gid: user.gid.as_raw(),
        home: user.dir,
        shell: user.shell,
        switch,
        umask,
    })
}

/// The umask a login gets, as `login(1)` and `pam_umask` give it: `UMASK` from
/// `/etc/login.defs` (022 when absent or malformed), and with `USERGROUPS_ENAB yes` the group
/// bits made the same as the owner's for a user with a private group (not root, uid equal to gid,
/// the primary group named after the user): 022 becomes 002.
pub(crate) fn login_umask(
    login_defs: &str,
    name: &str,
    uid: u32,
    gid: u32,
    group_name: Option<&str>,
) -> u32 {
    let setting = |key: &str| {
        login_defs.lines().find_map(|line| {
            let mut words = line.split_whitespace();
            (words.next() == Some(key))
                .then(|| words.next())
                .flatten()
                .map(str::to_owned)
        })
    };
    let mut umask = setting("UMASK")
        .and_then(|v| u32::from_str_radix(v.trim_start_matches("0o"), 8).ok())
        .filter(|m| *m <= 0o777)
        .unwrap_or(0o022);
    let usergroups = setting("USERGROUPS_ENAB").is_some_and(|v| v.eq_ignore_ascii_case("yes"));
    if usergroups && uid != 0 && uid == gid && group_name == Some(name) {
        umask = (umask & !0o070) | ((umask & 0o700) >> 3);
    }
    umask
}

/// At most this many client-supplied environment variables per session.
pub(crate) const MAX_ENV_VARS: usize = 64;
const MAX_ENV_NAME: usize = 128;
const MAX_ENV_VALUE: usize = 16 * 1024;

const DENIED_ENV: &[&str] = &[
    "HOME",
    "USER",
    "LOGNAME",
    "SHELL",
    "PATH",
    "MAIL",
    "IFS",
    "ENV",
    "BASH_ENV",
    "SHELLOPTS",
    "BASHOPTS",
    "PS4",
    "GLIBC_TUNABLES",
    "GCONV_PATH",
    "LOCPATH",
    "NLSPATH",
    "HOSTALIASES",
    "RES_OPTIONS",
    "LOCALDOMAIN",
];
const DENIED_ENV_PREFIXES: &[&str] = &["LD_", "MALLOC_", "BASH_FUNC_"];

/// May the client set `name=value` in the session's environment? (See the module docs.)
pub(crate) fn check_env(name: &str, value: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let well_formed = name.len() <= MAX_ENV_NAME
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !well_formed {
        return Err("not a plain identifier".into());
    }
    if DENIED_ENV.contains(&name) || DENIED_ENV_PREFIXES.iter().any(|p| name.starts_with(p)) {
        return Err("set by the node or unsafe to pass".into());
    }
    if value.len() > MAX_ENV_VALUE || value.contains('\0') {
        return Err("value too long or contains NUL".into());
    }
    Ok(())
}

/// What the session runs.
#[derive(Debug, Clone)]
pub(crate) enum Program {
    /// A login shell.
    Shell,
    /// `<shell> -c <command>`.
    Exec(Vec<u8>),
    /// A subsystem's server program, run directly (no shell): `sftp` is the node's own
    /// `sftp-server`.
    Subsystem { name: String, path: PathBuf },
}

/// Where OpenSSH's packages put `sftp-server` (Debian and Ubuntu, Fedora and RHEL, Arch, Alpine).
const SFTP_SERVERS: &[&str] = &[
    "/usr/lib/openssh/sftp-server",
    "/usr/libexec/openssh/sftp-server",
    "/usr/lib/ssh/sftp-server",
    "/usr/libexec/sftp-server",
];

/// The program that serves subsystem `name` on this node, or why there is none.
pub(crate) fn subsystem(name: &str) -> Result<Program, String> {
    match name {
        "sftp" => find_binary(SFTP_SERVERS)
            .map(|path| Program::Subsystem {
                name: "sftp".into(),
                path,
            })
            .ok_or_else(|| {
                "this node has no sftp-server (install OpenSSH's sftp server, e.g. the \
                 openssh-sftp-server package)"
                    .to_string()
            }),
        other => Err(format!(
            "unknown subsystem `{}`",
            other.chars().take(64).collect::<String>()
        )),
    }
}

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

fn find_binary(candidates: &[&str]) -> Option<PathBuf> {
    candidates
        .iter()
        .map(Path::new)
        .find(|p| p.is_file())
        .map(Path::to_path_buf)
}

/// The user's shell: absolute and usable as a command name after `env -i`, else `/bin/sh`.
fn shell_of(user: &LoginUser) -> PathBuf {
    let shell = &user.shell;
    let usable = shell.is_absolute() && !shell.as_os_str().as_bytes().contains(&b'=');
    if usable {
        shell.clone()
    } else {
        PathBuf::from("/bin/sh")
    }
}

/// The session's environment: identity variables, `TERM` for a PTY, then the client's variables
/// (already checked with [`check_env`]).
pub(crate) fn session_env(
    user: &LoginUser,
    term: Option<&str>,
    client_env: &[(String, String)],
    session_id: &str,
) -> Vec<(String, String)> {
    let mut env = vec![
        ("HOME".to_string(), user.home.to_string_lossy().into_owned()),
        ("USER".to_string(), user.name.clone()),
        ("LOGNAME".to_string(), user.name.clone()),
        (
            "SHELL".to_string(),
            shell_of(user).to_string_lossy().into_owned(),
        ),
        ("PATH".to_string(), DEFAULT_PATH.to_string()),
        ("MAIL".to_string(), format!("/var/mail/{}", user.name)),
        ("GATEHOUSE_SESSION_ID".to_string(), session_id.to_string()),
    ];
    if let Some(term) = term.filter(|t| !t.is_empty() && !t.contains('\0')) {
        env.push(("TERM".to_string(), term.to_string()));
    }
    for (k, v) in client_env {
        env.retain(|(name, _)| name != k);
        env.push((k.clone(), v.clone()));
    }
    env
}

/// Build the command for `program` as `user`. The command has a cleared environment, its working
/// directory at the user's home (or `/`), and, when the agent is root and the login another
/// account, runs through `setpriv` (uid, gid, supplementary groups from the group database) and
/// `env -i`, so no root process sees the client's variables. Without `setpriv` it falls back to
/// std's uid/gid switch, which leaves the session with no supplementary groups.
pub(crate) fn build_command(
    user: &LoginUser,
    program: &Program,
    env: &[(String, String)],
) -> Result<tokio::process::Command, String> {
    // The program and its arguments: the user's shell, or a subsystem's server.
    let mut program_path = shell_of(user);
    let mut shell_args: Vec<OsString> = Vec::new();
    match program {
        Program::Shell => shell_args.push("-l".into()),
        Program::Exec(command) => {
            if command.contains(&0) {
                return Err("the command contains a NUL byte".into());
            }
            shell_args.push("-c".into());
            shell_args.push(OsStr::from_bytes(command).to_os_string());
        }
        Program::Subsystem { path, .. } => program_path = path.clone(),
    }
    let home = if user.home.is_dir() {
        user.home.clone()
    } else {
        PathBuf::from("/")
    };

    let setpriv = if user.switch {
        find_binary(&["/usr/bin/setpriv", "/bin/setpriv"])
    } else {
        None
    };
    let env_bin = find_binary(&["/usr/bin/env", "/bin/env"]);
    let mut cmd = match (setpriv, env_bin) {
        (Some(setpriv), Some(env_bin)) => {
            let mut cmd = tokio::process::Command::new(setpriv);
            cmd.arg(format!("--reuid={}", user.uid))
                .arg(format!("--regid={}", user.gid))
                .arg("--init-groups")
                .arg("--")
                .arg(env_bin)
                .arg("-i");
            for (k, v) in env {
                cmd.arg(format!("{k}={v}"));
            }
            cmd.arg(&program_path).args(&shell_args);
            cmd.env_clear();
            cmd
        }
        _ => {
            if user.switch {
                tracing::warn!(
                    login = %user.name,
                    "ssh: setpriv not found: the session gets uid and gid but no supplementary groups"
                );
            }
            let mut cmd = tokio::process::Command::new(&program_path);
            cmd.args(&shell_args);
            cmd.env_clear();
            cmd.envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
            if user.switch {
                cmd.uid(user.uid).gid(user.gid);
            }
            cmd
        }
    };
    cmd.current_dir(home).kill_on_drop(true);
    set_umask(&mut cmd, user.umask);
    Ok(cmd)
}

/// Start the child with `umask` (the agent's own is not the login's).
#[allow(unsafe_code)]
fn set_umask(cmd: &mut tokio::process::Command, umask: u32) {
    let mode = nix::sys::stat::Mode::from_bits_truncate(umask as nix::libc::mode_t);
    // SAFETY: the closure runs in the child between fork and exec, where only
    // async-signal-safe calls are allowed: it makes one `umask(2)` system call (no allocation,
    // no lock) and touches no state shared with the parent.
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::stat::umask(mode);
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_policy() {
        assert!(check_env("FOO", "bar").is_ok());
        assert!(check_env("LC_ALL", "C.UTF-8").is_ok());
        assert!(check_env("_x1", "").is_ok());
        for bad in [
            "",
            "1A",
            "A-B",
            "A B",
            "PATH",
            "LD_PRELOAD",
            "BASH_FUNC_x%%",
            "HOME",
        ] {
            assert!(check_env(bad, "v").is_err(), "{bad}");
        }
        assert!(check_env("FOO", "a\0b").is_err());
        assert!(check_env("FOO", &"x".repeat(MAX_ENV_VALUE + 1)).is_err());
    }

    #[test]
    fn client_env_overrides_but_identity_stays() {
        let user = LoginUser {
            name: "alice".into(),
            uid: 1000,
            gid: 1000,
            home: "/home/alice".into(),
            shell: "/bin/bash".into(),
            switch: true,
            umask: 0o022,
        };
        let env = session_env(
            &user,
            Some("xterm"),
            &[
                ("TERM".into(), "vt100".into()),
                ("FOO".into(), "bar".into()),
            ],
            "sid",
        );
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("TERM"), Some("vt100"));
        assert_eq!(get("FOO"), Some("bar"));
        assert_eq!(get("USER"), Some("alice"));
        assert_eq!(get("SHELL"), Some("/bin/bash"));
        assert_eq!(env.iter().filter(|(n, _)| n == "TERM").count(), 1);
    }

    #[test]
    fn unusable_shells_fall_back_to_sh() {
        let mut user = LoginUser {
            name: "a".into(),
            uid: 1,
            gid: 1,
            home: "/".into(),
            shell: "".into(),
            switch: false,
            umask: 0o022,
        };
        assert_eq!(shell_of(&user), PathBuf::from("/bin/sh"));
        user.shell = "/bin/a=b".into();
        assert_eq!(shell_of(&user), PathBuf::from("/bin/sh"));
        user.shell = "/bin/bash".into();
        assert_eq!(shell_of(&user), PathBuf::from("/bin/bash"));
    }

    #[test]
    fn nul_in_command_is_refused() {
        let user = LoginUser {
            name: "a".into(),
            uid: 1,
            gid: 1,
            home: "/".into(),
            shell: "/bin/sh".into(),
            switch: false,
            umask: 0o022,
        };
        assert!(build_command(&user, &Program::Exec(b"echo \0".to_vec()), &[]).is_err());
        assert!(build_command(&user, &Program::Exec(b"echo hi".to_vec()), &[]).is_ok());
    }

    #[test]
    fn umask_from_login_defs_with_user_private_groups() {
        let debian = "# comment\nUMASK\t\t022\nUSERGROUPS_ENAB yes\n";
        assert_eq!(
            login_umask(debian, "alice", 1000, 1000, Some("alice")),
            0o002
        );
        // Not a private group: the plain value.
        assert_eq!(
            login_umask(debian, "alice", 1000, 100, Some("users")),
            0o022
        );
        assert_eq!(
            login_umask(debian, "alice", 1000, 1000, Some("staff")),
            0o022
        );
        // Root never gets the group bits relaxed.
        assert_eq!(login_umask(debian, "root", 0, 0, Some("root")), 0o022);
        assert_eq!(
            login_umask("UMASK 077\nUSERGROUPS_ENAB no\n", "a", 5, 5, Some("a")),
            0o077
        );
        assert_eq!(
            login_umask("UMASK 077\nUSERGROUPS_ENAB yes\n", "a", 5, 5, Some("a")),
            0o007
        );
        // Absent or malformed: 022.
        assert_eq!(login_umask("", "a", 5, 5, Some("a")), 0o022);
        assert_eq!(login_umask("UMASK 9x9\n", "a", 5, 6, None), 0o022);
    }

    #[test]
    fn subsystems() {
        assert!(matches!(
            subsystem("no-such-thing"),
            Err(e) if e.contains("unknown subsystem")
        ));
        match subsystem("sftp") {
            Ok(Program::Subsystem { name, path }) => {
                assert_eq!(name, "sftp");
                assert!(path.is_file());
            }
            Ok(other) => panic!("{other:?}"),
            // A node without OpenSSH's sftp server says what to install.
            Err(e) => assert!(e.contains("sftp-server"), "{e}"),
        }
    }
}
