// Command berth forwards Docker-published ports with one process: kernel
// NAT rules or an in-process relay, per mapping, kept in step with the
// Docker event stream.
package main

import (
	"fmt"
	"os"
	"strings"

	"github.com/sirupsen/logrus"
	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
)

// Set by the linker (make build).
var version = "dev"

// exitError carries a process exit code out of a command.
type exitError struct{ code int }

func (e exitError) Error() string { return fmt.Sprintf("exit %d", e.code) }

func main() {
	root := &cobra.Command{
		Use:           "berth",
		Short:         "Forward Docker-published ports with one process: kernel NAT or an in-process relay",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	g := &globalFlags{}
	g.register(root.PersistentFlags())
	root.PersistentPreRunE = func(cmd *cobra.Command, _ []string) error {
		if err := applyEnv(cmd.Flags()); err != nil {
			return err
		}
		return g.setupLog()
	}
	root.AddCommand(runCmd(g), reconcileCmd(g), statusCmd(g), versionCmd())
	if err := root.Execute(); err != nil {
		if e, ok := err.(exitError); ok {
			os.Exit(e.code)
		}
		fmt.Fprintln(os.Stderr, "berth:", err)
		os.Exit(1)
	}
}

// envName is a flag's environment twin: --resync-interval is
// BERTH_RESYNC_INTERVAL.
func envName(flag string) string {
	return "BERTH_" + strings.ToUpper(strings.ReplaceAll(flag, "-", "_"))
}

// applyEnv sets every flag not given on the command line from its twin.
func applyEnv(fs *pflag.FlagSet) error {
	var err error
	fs.VisitAll(func(f *pflag.Flag) {
		if f.Changed || err != nil {
			return
		}
		if v, ok := os.LookupEnv(envName(f.Name)); ok {
			if e := fs.Set(f.Name, v); e != nil {
				err = fmt.Errorf("%s=%q: %w", envName(f.Name), v, e)
			}
		}
	})
	return err
}

// withEnvUsage adds the env twin to every flag's help line.
func withEnvUsage(fs *pflag.FlagSet) {
	fs.VisitAll(func(f *pflag.Flag) {
		if !strings.Contains(f.Usage, "$BERTH_") {
			f.Usage += " [$" + envName(f.Name) + "]"
		}
	})
}

type globalFlags struct {
	dockerHost string
	httpAddr   string
	logFormat  string
	logLevel   string
	log        *logrus.Logger
}

func (g *globalFlags) register(fs *pflag.FlagSet) {
	fs.StringVar(&g.dockerHost, "docker-host", "", "Docker daemon socket (default: $DOCKER_HOST, else unix:///var/run/docker.sock)")
	fs.StringVar(&g.httpAddr, "http-addr", "127.0.0.1:9587", "address of the daemon's /status, /healthz and /metrics")
	fs.StringVar(&g.logFormat, "log-format", "auto", "log format: auto (text on a terminal, else json), text or json")
	fs.StringVar(&g.logLevel, "log-level", "info", "log level: debug, info, warn or error")
	withEnvUsage(fs)
}

func (g *globalFlags) setupLog() error {
	l := logrus.New()
	l.SetOutput(os.Stderr)
	lvl, err := logrus.ParseLevel(g.logLevel)
	if err != nil {
		return fmt.Errorf("--log-level: %w", err)
	}
	l.SetLevel(lvl)
	switch g.logFormat {
	case "json":
		l.SetFormatter(&logrus.JSONFormatter{})
	case "text":
		l.SetFormatter(&logrus.TextFormatter{FullTimestamp: true})
	case "auto":
		if fi, err := os.Stderr.Stat(); err == nil && fi.Mode()&os.ModeCharDevice != 0 {
			l.SetFormatter(&logrus.TextFormatter{FullTimestamp: true})
		} else {
			l.SetFormatter(&logrus.JSONFormatter{})
		}
	default:
		return fmt.Errorf("--log-format %q: want auto, text or json", g.logFormat)
	}
	g.log = l
	return nil
}

func versionCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "version",
		Short: "Print the version",
		Run:   func(*cobra.Command, []string) { fmt.Println("berth", version) },
	}
}
