package deploy

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/berth-dev/berth/test/harness"
	"go.yaml.in/yaml/v2"
)

// composeConfig validates a file with `docker-compose config` (Compose
// 1.29, Debian's docker-compose package) or `docker compose config`.
func composeConfig(t *testing.T, file string) {
	t.Helper()
	var cmd *exec.Cmd
	if _, err := exec.LookPath("docker-compose"); err == nil {
		cmd = exec.Command("docker-compose", "-f", file, "config", "-q")
	} else if out, err := exec.Command("docker", "compose", "version").CombinedOutput(); err == nil && strings.Contains(string(out), "version") {
		cmd = exec.Command("docker", "compose", "-f", file, "config", "-q")
	} else {
		need(t, "docker-compose")
	}
	cmd.Env = append(os.Environ(), "DOCKER_HOST=unix:///nonexistent.sock") // config never needs dockerd
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%s: %v\n%s", strings.Join(cmd.Args, " "), err, out)
	}
}

type composeFile struct {
	Version  string `yaml:"version"`
	Services map[string]struct {
		Image   string `yaml:"image"`
		Build   struct{ Context, Dockerfile string }
		Restart string   `yaml:"restart"`
		Priv    bool     `yaml:"privileged"`
		NetMode string   `yaml:"network_mode"`
		Pid     string   `yaml:"pid"`
		CapAdd  []string `yaml:"cap_add"`
		Volumes []any    `yaml:"volumes"`
		Env     map[string]string
		Nets    []string `yaml:"networks"`
		Deploy  struct {
			Mode          string
			RestartPolicy struct{ Condition string } `yaml:"restart_policy"`
		}
		Ports []any `yaml:"ports"`
	} `yaml:"services"`
	Networks map[string]struct {
		External bool
		Name     string
	} `yaml:"networks"`
}

func loadCompose(t *testing.T, rel string) composeFile {
	t.Helper()
	var c composeFile
	if err := yaml.Unmarshal([]byte(deployFile(t, rel)), &c); err != nil {
		t.Fatalf("%s: %v", rel, err)
	}
	if _, ok := c.Services["berth"]; !ok {
		t.Fatalf("%s: no berth service", rel)
	}
	return c
}

// mountsSocket reports whether a volume list binds the Docker socket.
func mountsSocket(vols []any) bool {
	for _, v := range vols {
		switch v := v.(type) {
		case string:
			if strings.HasPrefix(v, "/var/run/docker.sock:/var/run/docker.sock") {
				return true
			}
		case map[any]any:
			if v["source"] == "/var/run/docker.sock" && v["target"] == "/var/run/docker.sock" {
				return true
			}
		}
	}
	return false
}

func TestComposeFile(t *testing.T) {
	c := loadCompose(t, "compose.yaml")
	s := c.Services["berth"]
	if !s.Priv || s.NetMode != "host" || s.Pid != "host" || s.Restart != "always" {
		t.Errorf("berth service: privileged=%v network_mode=%q pid=%q restart=%q; want true, host, host, always",
			s.Priv, s.NetMode, s.Pid, s.Restart)
	}
	if !mountsSocket(s.Volumes) {
		t.Errorf("berth service does not mount /var/run/docker.sock: %v", s.Volumes)
	}
	if df := filepath.Join(root(t), "deploy", s.Build.Context, s.Build.Dockerfile); s.Build.Dockerfile == "" {
		t.Error("berth service has no build.dockerfile")
	} else if _, err := os.Stat(df); err != nil {
		t.Errorf("build context %q + dockerfile %q: %v", s.Build.Context, s.Build.Dockerfile, err)
	}
	composeConfig(t, filepath.Join(root(t), "deploy", "compose.yaml"))
}

func TestSwarmStack(t *testing.T) {
	c := loadCompose(t, "swarm-stack.yaml")
	if !strings.HasPrefix(c.Version, "3.") {
		t.Errorf("version %q: docker stack deploy needs a 3.x file", c.Version)
	}
	s := c.Services["berth"]
	if s.Deploy.Mode != "global" {
		t.Errorf("deploy.mode=%q, want global (one berth per node)", s.Deploy.Mode)
	}
	if s.Deploy.RestartPolicy.Condition != "any" {
		t.Errorf("deploy.restart_policy.condition=%q, want any", s.Deploy.RestartPolicy.Condition)
	}
	host := false
	for _, n := range s.Nets {
		if net, ok := c.Networks[n]; ok && net.External && net.Name == "host" {
			host = true
		}
	}
	if !host {
		t.Errorf("berth service is not on the external network named host: %v %v", s.Nets, c.Networks)
	}
	for _, want := range []string{"NET_ADMIN", "NET_RAW", "NET_BIND_SERVICE", "SYS_PTRACE"} {
		if !has(s.CapAdd, want) {
			t.Errorf("cap_add lacks %s: %v", want, s.CapAdd)
		}
	}
	if !mountsSocket(s.Volumes) {
		t.Errorf("berth service does not mount /var/run/docker.sock: %v", s.Volumes)
	}
	if len(s.Ports) > 0 {
		t.Errorf("berth publishes no ports (host network): %v", s.Ports)
	}
	composeConfig(t, filepath.Join(root(t), "deploy", "swarm-stack.yaml"))
}

// deploy/daemon.json is accepted by dockerd as it is, and with it dockerd
// writes no iptables rules and starts no docker-proxy.
func TestDaemonJSON(t *testing.T) {
	var cfg map[string]any
	if err := json.Unmarshal([]byte(deployFile(t, "daemon.json")), &cfg); err != nil {
		t.Fatalf("daemon.json: %v", err)
	}
	for k, v := range map[string]any{"userland-proxy": false, "iptables": false, "ip6tables": false} {
		if cfg[k] != v {
			t.Errorf("daemon.json: %s=%v, want %v", k, cfg[k], v)
		}
	}
	harness.Require(t)
	dir, err := os.MkdirTemp("", "berth-daemonjson-")
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "docker.sock")
	logf, err := os.Create(filepath.Join(dir, "dockerd.log"))
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("dockerd", "--config-file", filepath.Join(root(t), "deploy", "daemon.json"),
		"--data-root", filepath.Join(dir, "data"), "--exec-root", filepath.Join(dir, "exec"),
		"--host", "unix://"+sock, "--pidfile", filepath.Join(dir, "docker.pid"))
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(20 * time.Second):
			cmd.Process.Kill()
			<-done
		}
		logf.Close()
		if b, err := os.ReadFile("/proc/self/mounts"); err == nil {
			for _, l := range strings.Split(string(b), "\n") {
				if f := strings.Fields(l); len(f) > 1 && strings.HasPrefix(f[1], dir) {
					syscall.Unmount(f[1], syscall.MNT_DETACH)
				}
			}
		}
		os.RemoveAll(dir)
	})
	dlog := func() string { b, _ := os.ReadFile(filepath.Join(dir, "dockerd.log")); return tail(string(b), 30) }
	harness.Eventually(t, 30*time.Second, "dockerd with deploy/daemon.json", func() error {
		select {
		case <-done:
			t.Fatalf("dockerd refused deploy/daemon.json:\n%s", dlog())
		default:
		}
		out, err := exec.Command("docker", "-H", "unix://"+sock, "version", "--format", "{{.Server.Version}}").CombinedOutput()
		if err != nil {
			return fmt.Errorf("%v: %s", err, out)
		}
		return nil
	})
	for _, save := range []string{"iptables-nft-save", "iptables-legacy-save"} {
		out, err := exec.Command(save, "-t", "nat").CombinedOutput()
		if err != nil {
			continue
		}
		if strings.Contains(string(out), "-j DOCKER") {
			t.Errorf("dockerd with \"iptables\": false still jumps to DOCKER in %s:\n%s", save, out)
		}
	}
}
