//! Where settings come from. A binary reads them from the process environment; a test passes
//! a map, so that it never reads nor changes the environment of the test process, which every
//! test in it shares.
//!
//! With feature `cli`, [`parse_from`] parses a clap [`Parser`](clap::Parser) from the command
//! line and an [`Env`]: a flag wins over the environment, the environment over the default.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::hash::{BuildHasher, Hash};

/// A source of settings by name: the process environment, or a map in tests.
pub trait Env {
    /// The value of `name`, if set. A value that is not UTF-8 is `None` here; see
    /// [`Env::get_os`].
    fn get(&self, name: &str) -> Option<String>;

    /// The raw value of `name`. The process environment may hold bytes that are not UTF-8,
    /// which a path setting accepts and a text setting refuses by name, as clap does.
    fn get_os(&self, name: &str) -> Option<OsString> {
        self.get(name).map(OsString::from)
    }
}

/// The environment of this process.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn get(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }

    fn get_os(&self, name: &str) -> Option<OsString> {
        std::env::var_os(name)
    }
}

impl<K, V, S> Env for HashMap<K, V, S>
where
    K: std::borrow::Borrow<str> + Hash + Eq,
    V: AsRef<str>,
    S: BuildHasher,
{
    fn get(&self, name: &str) -> Option<String> {
        HashMap::get(self, name).map(|v| v.as_ref().to_owned())
    }
}

impl<K, V> Env for BTreeMap<K, V>
where
    K: std::borrow::Borrow<str> + Ord,
    V: AsRef<str>,
{
    fn get(&self, name: &str) -> Option<String> {
        BTreeMap::get(self, name).map(|v| v.as_ref().to_owned())
    }
}

/// Name-value pairs; the last pair with a name wins, as a later assignment does in a shell.
impl<K: AsRef<str>, V: AsRef<str>> Env for [(K, V)] {
    fn get(&self, name: &str) -> Option<String> {
        self.iter()
            .rev()
            .find(|(k, _)| k.as_ref() == name)
            .map(|(_, v)| v.as_ref().to_owned())
    }
}

impl<K: AsRef<str>, V: AsRef<str>, const N: usize> Env for [(K, V); N] {
    fn get(&self, name: &str) -> Option<String> {
        Env::get(self.as_slice(), name)
    }
}

impl<K: AsRef<str>, V: AsRef<str>> Env for Vec<(K, V)> {
    fn get(&self, name: &str) -> Option<String> {
        Env::get(self.as_slice(), name)
    }
}

impl<E: Env + ?Sized> Env for &E {
    fn get(&self, name: &str) -> Option<String> {
        (**self).get(name)
    }

    fn get_os(&self, name: &str) -> Option<OsString> {
        (**self).get_os(name)
    }
}

/// Every setting that is not valid, one message a line, each naming its setting: an operator
/// fixes them all in one go instead of one per restart.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigErrors(Vec<String>);

impl ConfigErrors {
    pub fn new() -> ConfigErrors {
        ConfigErrors::default()
    }

    /// Adds a message; it must name the setting (`SCAN_TIMEOUT_SECONDS must be positive`).
    pub fn push(&mut self, message: impl Into<String>) {
        self.0.push(message.into());
    }

    /// The value of `result`, or `None` with its error added.
    pub fn check<T, E: Into<String>>(&mut self, result: Result<T, E>) -> Option<T> {
        result.map_err(|e| self.push(e)).ok()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn messages(&self) -> &[String] {
        &self.0
    }

    /// `Err(self)` when an error was added.
    pub fn into_result(self) -> Result<(), ConfigErrors> {
        if self.is_empty() { Ok(()) } else { Err(self) }
    }
}

impl std::fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, message) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            f.write_str(message)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

#[cfg(feature = "cli")]
pub use self::cli::{parse, parse_from};

#[cfg(feature = "cli")]
mod cli {
    use std::any::TypeId;
    use std::collections::HashSet;
    use std::ffi::OsString;
    use std::path::PathBuf;

    use clap::error::{ContextKind, ContextValue, ErrorKind};
    use clap::parser::ValueSource;
    use clap::{Arg, ArgMatches, Command, CommandFactory, FromArgMatches};

    use super::Env;

    /// Parses `P` from this process's arguments and `env`; exits with clap's message (code 2,
    /// or 0 for `--help` and `--version`) when they are not valid.
    pub fn parse<P: CommandFactory + FromArgMatches>(env: &(impl Env + ?Sized)) -> P {
        parse_from(std::env::args_os(), env).unwrap_or_else(|e| e.exit())
    }

    /// Parses `P` from `argv` (program name first) and `env`.
    ///
    /// Each argument declared with `env = "NAME"` takes, in this order: its flag, `NAME` from
    /// `env`, its default. clap itself never reads the process environment here: the names
    /// are looked up in `env` only. Values from `env` go through the argument's own value
    /// parser, so they mean what they meant when clap read them (`true`/`false` for a flag,
    /// a number in range, one of the possible values). Every value from `env` that does not
    /// parse is named in one error; a bad value under a flag that was given does not count.
    ///
    /// `--help` lists each argument's variable name, without the value.
    ///
    /// Only the top-level arguments are looked up; a value from `env` is not checked against
    /// `conflicts_with` or `requires`, which none of our arguments declare.
    pub fn parse_from<P, I, T>(argv: I, env: &(impl Env + ?Sized)) -> Result<P, clap::Error>
    where
        P: CommandFactory + FromArgMatches,
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let argv: Vec<OsString> = argv.into_iter().map(Into::into).collect();
        let declared = P::command();

        // Values from `env` by argument id, for the arguments that declare a name.
        let mut from_env: Vec<Setting> = declared
            .get_arguments()
            .filter_map(|arg| {
                let name = arg.get_env()?.to_str()?.to_owned();
                let value = env.get_os(&name)?;
                Some(Setting {
                    id: arg.get_id().as_str().to_owned(),
                    name,
                    value,
                    hide_value: arg.is_hide_env_values_set(),
                })
            })
            .collect();

        // `env(None)` drops the value clap captured from the process environment when the
        // argument was built. An argument whose value comes from `env` is not required on
        // the command line.
        let bare = declared.clone().mut_args(|arg| {
            let supplied = from_env.iter().any(|s| s.id == arg.get_id().as_str());
            let arg = arg.env(None);
            if supplied { arg.required(false) } else { arg }
        });

        let given = match bare.clone().try_get_matches_from(&argv) {
            Ok(matches) => given_on_command_line(&bare, &matches),
            Err(e) => return Err(with_env_names_in_help(e, declared, &argv)),
        };
        from_env.retain(|s| !given.contains(&s.id));

        // A value from `env` becomes the argument's default: clap then parses it exactly as it
        // would have parsed the variable (both go through the same step), and a flag still
        // wins. A value that does not parse is set aside, and parsing starts again without it.
        let mut rejected: Vec<(Setting, String)> = Vec::new();
        loop {
            let mut cmd = bare.clone().mut_args(|arg| {
                match from_env.iter().find(|s| s.id == arg.get_id().as_str()) {
                    Some(s) => arg.default_value(s.value.clone()),
                    None => arg,
                }
            });
            match cmd.try_get_matches_from_mut(&argv) {
                Ok(mut matches) if rejected.is_empty() => {
                    return P::from_arg_matches_mut(&mut matches).map_err(|e| e.format(&mut cmd));
                }
                Ok(_) => return Err(invalid_settings(&rejected, &mut cmd)),
                Err(e) => {
                    let Some(at) = setting_at_fault(&e, &cmd, &from_env) else {
                        return Err(e);
                    };
                    let setting = from_env.remove(at);
                    rejected.push((setting, reason(&e)));
                }
            }
        }
    }

    /// A value found in the [`Env`] for an argument.
    struct Setting {
        id: String,
        name: String,
        value: OsString,
        hide_value: bool,
    }

    fn given_on_command_line(cmd: &Command, matches: &ArgMatches) -> HashSet<String> {
        cmd.get_arguments()
            .map(|arg| arg.get_id().as_str())
            .filter(|id| matches.value_source(id) == Some(ValueSource::CommandLine))
            .map(str::to_owned)
            .collect()
    }

    /// The index in `from_env` of the setting whose value `e` refuses, if `e` is about a value
    /// that came from `env` (clap names the argument by its `Display` form).
    fn setting_at_fault(e: &clap::Error, cmd: &Command, from_env: &[Setting]) -> Option<usize> {
        if !matches!(
            e.kind(),
            ErrorKind::InvalidValue | ErrorKind::ValueValidation | ErrorKind::InvalidUtf8
        ) {
            return None;
        }
        if e.kind() == ErrorKind::InvalidUtf8 {
            // clap does not name the argument: it is one whose value is not UTF-8 and whose
            // parser wants text.
            return from_env.iter().position(|s| {
                s.value.to_str().is_none()
                    && cmd
                        .get_arguments()
                        .find(|arg| arg.get_id().as_str() == s.id)
                        .is_some_and(|arg| !takes_os_string(arg))
            });
        }
        let Some(ContextValue::String(invalid)) = e.get(ContextKind::InvalidArg) else {
            return None;
        };
        let arg: &Arg = cmd
            .get_arguments()
            .find(|arg| arg.to_string() == *invalid)?;
        from_env.iter().position(|s| s.id == arg.get_id().as_str())
    }

    fn takes_os_string(arg: &Arg) -> bool {
        let parses_to = arg.get_value_parser().type_id();
        parses_to == TypeId::of::<OsString>() || parses_to == TypeId::of::<PathBuf>()
    }

    /// Why clap refused a value, without the argument's flag (the caller names the setting).
    fn reason(e: &clap::Error) -> String {
        if let Some(source) = std::error::Error::source(e) {
            return source.to_string();
        }
        if let Some(ContextValue::Strings(valid)) = e.get(ContextKind::ValidValue) {
            return format!("expected one of {}", valid.join(", "));
        }
        e.kind().as_str().unwrap_or("invalid value").to_owned()
    }

    fn invalid_settings(rejected: &[(Setting, String)], cmd: &mut Command) -> clap::Error {
        let lines: Vec<String> = rejected
            .iter()
            .map(|(s, why)| {
                if s.hide_value {
                    format!("{}: invalid value: {why}", s.name)
                } else {
                    format!("{}={:?}: {why}", s.name, s.value)
                }
            })
            .collect();
        clap::Error::raw(
            ErrorKind::ValueValidation,
            format!(
                "invalid settings in the environment:\n  {}",
                lines.join("\n  ")
            ),
        )
        .format(cmd)
    }

    /// clap renders `--help` from the command it parsed, which has no variable names any
    /// more; render it again from the declared command. The values are hidden: they are the
    /// process environment's, which may not be the `Env` this parse reads.
    fn with_env_names_in_help(e: clap::Error, declared: Command, argv: &[OsString]) -> clap::Error {
        if !matches!(
            e.kind(),
            ErrorKind::DisplayHelp | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
        ) {
            return e;
        }
        let help = declared.mut_args(|arg| {
            if arg.get_env().is_some() {
                arg.hide_env_values(true)
            } else {
                arg
            }
        });
        match help.try_get_matches_from(argv) {
            Err(help) if help.kind() == e.kind() => help,
            _ => e,
        }
    }
}

#[cfg(test)]
mod config_errors_tests {
    use super::ConfigErrors;

    #[test]
    fn each_error_is_a_line_of_its_own() {
        let mut errors = ConfigErrors::new();
        assert_eq!(errors.clone().into_result(), Ok(()));
        errors.push("A must be positive");
        assert_eq!(errors.check(Ok::<_, String>(1)), Some(1));
        assert_eq!(errors.check(Err::<u8, _>("B must be set")), None);
        assert_eq!(errors.to_string(), "A must be positive\nB must be set");
        assert_eq!(errors.messages().len(), 2);
        assert!(errors.into_result().is_err());
    }
}

#[cfg(all(test, feature = "cli"))]
mod tests {
    use super::*;
    use clap::Parser;
    use clap::error::ErrorKind;

    #[derive(Debug, Parser)]
    #[command(name = "test")]
    struct Flags {
        /// A port.
        #[arg(long, env = "TEST_PORT", default_value_t = 6379)]
        port: u16,
        /// A host.
        #[arg(long, env = "TEST_HOST", default_value = "localhost")]
        host: String,
        /// A flag that takes no value on the command line.
        #[arg(long, env = "TEST_TLS", default_value_t = false)]
        tls: bool,
        /// A bool that takes a value.
        #[arg(
            long,
            env = "TEST_SHARED",
            default_value_t = true,
            action = clap::ArgAction::Set,
            value_parser = clap::builder::BoolishValueParser::new()
        )]
        shared: bool,
        /// One of a few words.
        #[arg(long, env = "TEST_MODE", default_value = "strip", value_parser = ["strip", "refuse"])]
        mode: String,
        #[arg(long, env = "TEST_SECRET", hide_env_values = true)]
        secret: Option<u32>,
        #[arg(long, env = "TEST_DIR")]
        dir: Option<std::path::PathBuf>,
        /// Named after a variable every process has, to show the process's is not read.
        #[arg(long, env = "PATH", default_value = "unset")]
        path: String,
    }

    fn parse(argv: &[&str], env: &[(&str, &str)]) -> Result<Flags, clap::Error> {
        parse_from(std::iter::once("test").chain(argv.iter().copied()), env)
    }

    #[test]
    fn a_flag_wins_over_the_environment() {
        let f = parse(
            &["--port", "1", "--host=h", "--shared", "true", "--tls"],
            &[
                ("TEST_PORT", "2"),
                ("TEST_HOST", "e"),
                ("TEST_SHARED", "no"),
                ("TEST_TLS", "false"),
            ],
        )
        .unwrap();
        assert_eq!(
            (f.port, f.host.as_str(), f.shared, f.tls),
            (1, "h", true, true)
        );
    }

    #[test]
    fn the_environment_wins_over_the_default() {
        let f = parse(
            &[],
            &[
                ("TEST_PORT", "6380"),
                ("TEST_HOST", "redis"),
                ("TEST_MODE", "refuse"),
            ],
        )
        .unwrap();
        assert_eq!(
            (f.port, f.host.as_str(), f.mode.as_str()),
            (6380, "redis", "refuse")
        );
    }

    #[test]
    fn defaults_are_kept_when_neither_is_given() {
        let f = parse(&[], &[]).unwrap();
        assert_eq!(
            (f.port, f.host.as_str(), f.tls, f.shared),
            (6379, "localhost", false, true)
        );
        assert_eq!((f.mode.as_str(), f.secret), ("strip", None));
    }

    #[test]
    fn the_process_environment_is_not_read() {
        assert!(
            std::env::var_os("PATH").is_some(),
            "the test needs PATH set"
        );
        assert_eq!(parse(&[], &[]).unwrap().path, "unset");
        assert_eq!(ProcessEnv.get_os("PATH"), std::env::var_os("PATH"));
    }

    #[test]
    fn bool_values_from_the_environment() {
        assert!(parse(&[], &[("TEST_TLS", "true")]).unwrap().tls);
        assert!(!parse(&[], &[("TEST_TLS", "false")]).unwrap().tls);
        for off in ["false", "no", "0", "off"] {
            assert!(
                !parse(&[], &[("TEST_SHARED", off)]).unwrap().shared,
                "{off}"
            );
        }
        assert!(parse(&[], &[("TEST_SHARED", "yes")]).unwrap().shared);
    }

    #[test]
    fn maps_and_pairs_are_sources() {
        let hash: HashMap<&str, &str> = [("TEST_PORT", "1")].into();
        let tree: BTreeMap<String, String> = [("TEST_PORT".into(), "2".into())].into();
        let argv = ["test"];
        assert_eq!(parse_from::<Flags, _, _>(argv, &hash).unwrap().port, 1);
        assert_eq!(parse_from::<Flags, _, _>(argv, &tree).unwrap().port, 2);
        // The last assignment wins.
        assert_eq!(
            parse(&[], &[("TEST_PORT", "1"), ("TEST_PORT", "3")])
                .unwrap()
                .port,
            3
        );
    }

    #[test]
    fn every_invalid_value_is_named_in_one_error() {
        let e = parse(
            &[],
            &[
                ("TEST_PORT", "70000"),
                ("TEST_TLS", "yes"),
                ("TEST_MODE", "sometimes"),
                ("TEST_HOST", "fine"),
            ],
        )
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ValueValidation);
        let msg = e.to_string();
        for name in [
            "TEST_PORT=\"70000\"",
            "TEST_TLS=\"yes\"",
            "TEST_MODE=\"sometimes\"",
        ] {
            assert!(msg.contains(name), "{msg}");
        }
        assert!(msg.contains("strip, refuse"), "{msg}");
        assert!(!msg.contains("TEST_HOST"), "{msg}");
        assert!(
            parse(&[], &[("TEST_PORT", "x")])
                .unwrap_err()
                .to_string()
                .contains("TEST_PORT")
        );
    }

    #[test]
    fn a_hidden_value_is_not_echoed() {
        let msg = parse(&[], &[("TEST_SECRET", "hunter2")])
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("TEST_SECRET") && !msg.contains("hunter2"),
            "{msg}"
        );
        assert_eq!(parse(&[], &[("TEST_SECRET", "7")]).unwrap().secret, Some(7));
    }

    /// A process environment with bytes that are not UTF-8.
    struct Raw(&'static str, &'static [u8]);

    impl Env for Raw {
        fn get(&self, _: &str) -> Option<String> {
            None
        }

        fn get_os(&self, name: &str) -> Option<OsString> {
            use std::os::unix::ffi::OsStringExt;
            (name == self.0).then(|| OsString::from_vec(self.1.to_vec()))
        }
    }

    #[test]
    fn a_value_that_is_not_utf8_is_a_path_but_not_text() {
        let f: Flags = parse_from(["test"], &Raw("TEST_DIR", b"/tmp/\xff")).unwrap();
        assert_eq!(f.dir.unwrap().as_os_str().len(), 6);
        let e = parse_from::<Flags, _, _>(["test"], &Raw("TEST_HOST", b"\xff")).unwrap_err();
        assert!(e.to_string().contains("TEST_HOST"), "{e}");
    }

    #[test]
    fn an_invalid_value_under_a_given_flag_is_not_an_error() {
        assert_eq!(
            parse(&["--port", "1"], &[("TEST_PORT", "x")]).unwrap().port,
            1
        );
    }

    #[test]
    fn command_line_errors_are_clap_errors() {
        let e = parse(&["--port", "x"], &[]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ValueValidation);
        assert!(e.to_string().contains("--port"), "{e}");
        let e = parse(&["--nope"], &[]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::UnknownArgument);
    }

    #[test]
    fn help_lists_the_variable_names() {
        let e = parse(&["--help"], &[("TEST_HOST", "h")]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::DisplayHelp);
        let help = e.to_string();
        for name in ["[env: TEST_PORT]", "[env: TEST_TLS]", "[env: TEST_SECRET]"] {
            assert!(help.contains(name), "{help}");
        }
        assert!(help.contains("[default: localhost]"), "{help}");
    }
}
