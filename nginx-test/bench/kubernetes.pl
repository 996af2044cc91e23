# The measurement behind nginx-test/bench/kubernetes.
use strict;
use warnings;
use IO::Socket::INET;
use POSIX ();
use Time::HiRes qw(time sleep);
use Edge::Test qw(http_get wait_for);
use Edge::FakeKube;

my ($count, $rate, $seconds, $nodes) = @ARGV;
$nodes //= 0;
my $workers = 2;

sub kb {
    my ($pid) = @_;
    open my $fh, '<', "/proc/$pid/smaps_rollup" or return 0;
    local $/;
    my ($kb) = <$fh> =~ /^Pss:\s+(\d+) kB/m;
    return $kb // 0;
}

sub cpu_ticks {
    my ($pid) = @_;
    open my $fh, '<', "/proc/$pid/stat" or return 0;
    my @f = split ' ', (<$fh> =~ s/^.*\) //r);
    return $f[11] + $f[12];    # utime + stime
}

sub workers {
    my ($t) = @_;
    my $master = $t->pid;
    return grep { /^\d+$/ } split /\s+/, `ps -o pid= --ppid $master`;
}

sub fat_ingress {
    my ($i) = @_;
    my $o = Edge::FakeKube::ingress("ns" . ($i % 50), "ing$i", hosts => ["h$i.example.com"],
        tls => ["h$i.example.com"], class => 'nginx', ip => '10.0.0.' . ($i % 250 + 1));
    # Real managedFields run to a few kB: one entry per manager, each with the full field set.
    $o->{metadata}{managedFields} = [map { {
        manager => $_, operation => 'Update', apiVersion => 'networking.k8s.io/v1',
        time => '2026-11-29T10:00:00Z', fieldsType => 'FieldsV1',
        fieldsV1 => { 'f:metadata' => { 'f:annotations' => { map { ("f:annotation-$_" => {}) } 1 .. 10 } },
            'f:spec' => { 'f:ingressClassName' => {}, 'f:rules' => {}, 'f:tls' => {} },
            'f:status' => { 'f:loadBalancer' => { 'f:ingress' => {} } } },
    } } qw(kubectl-client-side-apply nginx-ingress-controller cert-manager argocd)];
    $o->{metadata}{labels} = { map { ("app.kubernetes.io/label-$_" => "value-$i") } 1 .. 5 };
    return $o;
}

my $t = Edge::Test->new;
my $dir = $t->dir;
my $kube = Edge::FakeKube->new($t, 'a');
$kube->add(fat_ingress($_)) for 1 .. $count;
# The cluster's nodes, each running one pod of the ingress controller (a hostPort DaemonSet):
# a Node and an EndpointSlice each, read for an upstream that discovers them.
for my $i (1 .. $nodes) {
    my $ip = sprintf '10.%d.%d.%d', 100 + int($i / 65536), int($i / 256) % 256, $i % 256;
    $kube->add(Edge::FakeKube::node("node$i", $ip, labels => { 'node-role.kubernetes.io/worker' => 'true' }));
    $kube->add(Edge::FakeKube::endpointslice('kube-system', "ingress-$i", 'ingress',
        ["10.42.@{[int($i / 256) % 256]}.@{[$i % 256]}", "node$i", ready => 'true']));
}
$kube->start;
my $log_mb = (-s "$dir/kube-a/log") / 1e6;

my $discover = $nodes ? ', "nodes": {"discover": {"source": "a", "service": "kube-system/ingress", "address": "node"}}' : '';
$t->write_routes('routes.json', <<"CONF");
{"upstreams": {"cluster": {"servers": ["127.0.0.1:%%PORT_b%%"]}$discover}, "routes": {"probe.test": "cluster"}}
CONF
my $url = $kube->url;
my $discover_arg = $nodes ? 'discover=nodes,endpoints' : '';
$t->config(<<"CONF", workers => $workers);
    edge_routes %%TESTDIR%%/routes.json;
    edge_routes_url $url name=a format=k8s upstream=cluster $discover_arg;
    edge_state %%TESTDIR%%/state;
    server { listen 127.0.0.1:%%PORT_edge%% reuseport; edge_route http; proxy_pass \$edge_upstream; }
    server { listen 127.0.0.1:%%PORT_status%%; edge_status; }
    server { listen 127.0.0.1:%%PORT_b%%; return "b"; }
CONF
my $conf = $t->read_file('nginx.conf');
$conf =~ s/access_log \S+ edge;/access_log off;/;
$conf =~ s/error_log (\S+) info;/error_log $1 notice;/;
$t->write_file('nginx.conf', $conf);
my $edge = $t->port('edge');

# A probe through the edge every 10 ms: the slowest first byte shows a stalled event loop.
sub probe {
    my ($file) = @_;
    my $pid = fork() // die;
    return $pid if $pid;
    my ($max, $n) = (0, 0);
    my $stop = 0;
    $SIG{TERM} = sub { $stop = 1 };
    while (!$stop) {
        my $t0 = time;
        if (my $s = IO::Socket::INET->new(PeerAddr => "127.0.0.1:$edge", Timeout => 10)) {
            print $s "GET / HTTP/1.0\r\nHost: probe.test\r\n\r\n";
            sysread($s, my $got, 1);
            close $s;
        }
        last if $stop;    # the read cut short by the TERM that ends the probe
        my $took = time - $t0;
        $max = $took if $took > $max;
        $n++;
        if (open my $f, '>', "$file.tmp") { printf $f "%d %.3f\n", $n, $max * 1000; close $f; rename "$file.tmp", $file }
        sleep 0.01;
    }
    POSIX::_exit(0);
}

my $started = time;
$t->run;
my $probe = probe("$dir/probe-list");
my $last = "h$count.example.com";
my $streak = 0;
wait_for(sub { $streak = http_get($edge, $last) eq 'b' ? $streak + 1 : 0; $streak >= 10 }, 'every worker routes the list', 300);
my $list_s = time - $started;
kill 'TERM', $probe;
waitpid($probe, 0);
my (undef, $probe_list_ms) = split ' ', $t->read_file('probe-list');
my @w = workers($t);
my $status = Edge::Test::status_json($t->port('status'));
my $u = $status->{urls}[0];
my ($swap_ms) = sort { $b <=> $a } $t->read_file('error.log') =~ /event loop spent ([\d.]+) ms/g;
my $pss = 0;
$pss += kb($_) for @w;

# Watch events: $rate new Ingresses a second for $seconds; a prober times each to routable.
my $cpu0 = 0;
$cpu0 += cpu_ticks($_) for @w;
my $applier = fork() // die;
if ($applier == 0) {
    my $t0 = time;
    for my $i (1 .. $rate * $seconds) {
        my $due = $t0 + ($i - 1) / $rate;
        my $now = time;
        sleep($due - $now) if $due > $now;
        my $o = Edge::FakeKube::ingress('ev', "ev$i", hosts => ["ev$i.test"], class => 'nginx');
        $kube->add($o);
        if (open my $f, '>>', "$dir/applied") { printf $f "%d %.6f\n", $i, time; close $f }
    }
    POSIX::_exit(0);
}
my $probe_watch = probe("$dir/probe-watch");
my (@delays, %applied);
my $next = 1;
my $total = $rate * $seconds;
my $deadline = time + $seconds + 60;
my $pos = 0;
my $tries = 0;
while ($next <= $total && time < $deadline) {
    if (open my $f, '<', "$dir/applied") {
        seek $f, $pos, 0;
        while (my $line = <$f>) {
            last unless $line =~ /\n$/;
            my ($i, $at) = split ' ', $line;
            $applied{$i} = $at;
            $pos = tell $f;
        }
    }
    if (!exists $applied{$next}) { sleep 0.005; next }
    my $s = IO::Socket::INET->new(PeerAddr => "127.0.0.1:$edge", Timeout => 10) or next;
    $tries++;
    print $s "GET / HTTP/1.0\r\nHost: ev$next.test\r\n\r\n";
    sysread($s, my $got, 1);
    close $s;
    if (($got // '') eq 'b') {
        my $now = time;
        # Names are published in order: every one applied up to here routes now too.
        while (exists $applied{$next} && $next <= $total) {
            push @delays, $now - $applied{$next};
            $next++;
        }
        next;
    }
    sleep 0.005;
}
waitpid($applier, 0);
kill 'TERM', $probe_watch;
waitpid($probe_watch, 0);
my ($probe_watch_n, $probe_watch_ms) = split ' ', $t->read_file('probe-watch');
my $cpu1 = 0;
$cpu1 += cpu_ticks($_) for @w;
my $hz = POSIX::sysconf(POSIX::_SC_CLK_TCK()) || 100;
my $cpu_per_event_ms = ($cpu1 - $cpu0) / $hz * 1000 / (@delays || 1);
# The probes' connections cost the workers too (each is two: to the edge, then to the
# backend, a server of the same nginx): that cost per connection, measured with as many
# connections again and no event, is taken out of the figure above.
my $probes = $tries + $probe_watch_n;
my $cpu2 = 0;
$cpu2 += cpu_ticks($_) for @w;
for (1 .. $probes) {
    my $s = IO::Socket::INET->new(PeerAddr => "127.0.0.1:$edge", Timeout => 10) or next;
    print $s "GET / HTTP/1.0\r\nHost: ev1.test\r\n\r\n";
    sysread($s, my $got, 1);
    close $s;
}
my $cpu3 = 0;
$cpu3 += cpu_ticks($_) for @w;
my $per_probe_ms = ($cpu3 - $cpu2) / $hz * 1000 / ($probes || 1);
my $source_per_event_ms = (($cpu1 - $cpu0) / $hz * 1000 - $probes * $per_probe_ms) / (@delays || 1);
$status = Edge::Test::status_json($t->port('status'));
my $longest = $status->{urls}[0]{longest_step_ms};
my @swaps = sort { $a <=> $b } $t->read_file('error.log') =~ /event loop spent ([\d.]+) ms/g;
my @swaps_cpu = sort { $a <=> $b } $t->read_file('error.log') =~ /event loop spent [\d.]+ ms on it \(([\d.]+) ms of CPU\)/g;
my $swap_watch_ms = $swaps[-1];
my $swap_median = @swaps ? $swaps[int($#swaps / 2)] : 0;
@delays = sort { $a <=> $b } @delays;
my $pct = sub { my ($p) = @_; @delays ? $delays[int($p * $#delays)] * 1000 : -1 };
$t->stop;

printf "Kubernetes source: %d Ingresses%s (API log %.1f MB), %d workers, nginx-edge %s\n\n",
    $count, $nodes ? ", $nodes Nodes and their EndpointSlices (an upstream of the nodes with an ingress pod)" : '',
    $log_mb, $workers, $status->{version};
print "| measure | value | target |\n|---|---|---|\n";
printf "| list: start to every worker routing all %d hosts | %.2f s | |\n", $count, $list_s;
printf "| longest event-loop step of the source (leader, CPU time) | %.2f ms | <= 5 ms |\n", $u->{longest_step_ms};
printf "| longest table swap in a worker's event loop | %.2f ms | <= 5 ms |\n", $swap_ms // 0;
printf "| slowest probe first byte during the list | %.1f ms | |\n", $probe_list_ms;
printf "| PSS of the %d workers after the list | %.1f MB | |\n", $workers, $pss / 1024;
printf "| watch: events applied / seen routable | %d / %d | |\n", $total, scalar @delays;
printf "| event to routable: median | %.0f ms | |\n", $pct->(0.5);
printf "| event to routable: p99 | %.0f ms | <= 1000 ms |\n", $pct->(0.99);
printf "| event to routable: max | %.0f ms | |\n", $pct->(1);
printf "| longest event-loop step of the source during the events (CPU time) | %.2f ms | <= 5 ms |\n", $longest;
printf "| table swaps in the workers' event loops (wall time): count, median, max | %d, %.2f ms, %.2f ms | |\n",
    scalar @swaps, $swap_median, $swap_watch_ms // 0;
printf "| table swaps in the workers' event loops (CPU time): median, max | %.2f ms, %.2f ms | <= 1 ms |\n",
    @swaps_cpu ? ($swaps_cpu[int($#swaps_cpu / 2)], $swaps_cpu[-1]) : (0, 0);
printf "| slowest probe first byte during the events | %.1f ms | |\n", $probe_watch_ms;
printf "| workers' CPU per event, with the probes' %d connections | %.2f ms | |\n", $probes, $cpu_per_event_ms;
printf "| workers' CPU per event, less the probes' (%.0f us per connection) | %.2f ms | <= 1 ms |\n",
    $per_probe_ms * 1000, $source_per_event_ms;
