#!/usr/bin/perl
# An API server that answers as fast as it can with no end (list bodies that never end, one
# announced as 1 GiB): the worker that fetches it reads a bounded amount per turn of its event
# loop, stops at the documented limit (64 MiB for a list page; the 4 MiB of a watch event are
# t/k8s-errors.t's), asks for smaller pages, and its memory stays bounded; a probe through
# the edge every 100 ms is answered all along.

use strict;
use warnings;
use Test::More;
use IO::Socket::INET;
use POSIX ();
use Time::HiRes qw(time sleep);
use Edge::Test qw(http_get wait_for);

my $t = Edge::Test->new;
my $dir = $t->dir;
my $port = $t->port('hostile');

# The hostile server: a list answered with a body of 1 GiB announced by Content-Length (the
# first Ingress page asked for), or an endless chunked one (the others, the IngressClasses
# the edge reads beside them included).
# One process per connection; each writes down how much it could send.
my $listen = IO::Socket::INET->new(Listen => 64, LocalAddr => '127.0.0.1', LocalPort => $port,
    ReuseAddr => 1) or die "hostile server: $!\n";
my $server = fork() // die;
if ($server == 0) {
    $SIG{CHLD} = 'IGNORE';
    $SIG{PIPE} = 'IGNORE';
    while (my $c = $listen->accept) {
        next if fork();
        my $req = '';
        while ($req !~ /\r\n\r\n/) { sysread($c, $req, 4096, length $req) or POSIX::_exit(0) }
        if (open my $log, '>>', "$dir/hostile.log") { print $log (split /\r\n/, $req)[0], "\n"; close $log }
        my $chunk = 'x' x (1 << 20);
        my ($framed, $sent) = ($chunk, 0);
        if ($req =~ m{/ingresses\?limit=500\b}) {
            print $c "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1073741824\r\n\r\n";
        } else {
            print $c "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
            my $piece = $req =~ /watch=1/ ? '{"type":"ADDED","object":{"metadata":{"name":"' : '{"items":["';
            syswrite($c, sprintf("%x\r\n%s\r\n", length $piece, $piece));
            $framed = sprintf("%x\r\n%s\r\n", length $chunk, $chunk);
        }
        $c->flush;
        while (1) { my $n = syswrite($c, $framed) // last; $sent += $n }
        if (open my $log, '>>', "$dir/hostile.sent") { print $log "$sent\n"; close $log }
        POSIX::_exit(0);
    }
    POSIX::_exit(0);
}
close $listen;
END { local $?; if ($server) { kill 'KILL', $server; waitpid($server, 0) } }

$t->write_routes('routes.json', <<'EOF');
{"upstreams": {"a": {"servers": ["127.0.0.1:%%PORT_a%%"]}}, "routes": {"shop.test": "a"}}
EOF
$t->config(<<"EOF");
    edge_routes %%TESTDIR%%/routes.json;
    edge_routes_url http://127.0.0.1:$port/apis/networking.k8s.io/v1/ingresses name=hostile format=k8s upstream=a timeout=30s;
    edge_state %%TESTDIR%%/state;
    server { listen 127.0.0.1:%%PORT_edge%%; edge_route http; proxy_pass \$edge_upstream; }
    server { listen 127.0.0.1:%%PORT_status%%; edge_status; }
    server { listen 127.0.0.1:%%PORT_a%%; return "a"; }
EOF
$t->run;
my $edge = $t->port('edge');
my ($worker) = $t->read_file('error.log') =~ /start worker process (\d+)/;
my $peak = sub { open my $f, '<', "/proc/$worker/status" or return 0; local $/; (<$f> =~ /VmHWM:\s+(\d+) kB/)[0] // 0 };

# The probe: a connection through the edge every 100 ms; the slowest answer goes to a file.
my $probe = fork() // die;
if ($probe == 0) {
    my ($max, $n, $failed, $stop) = (0, 0, 0, 0);
    $SIG{TERM} = sub { $stop = 1 };
    while (!$stop) {
        my $t0 = time;
        my $got = http_get($edge, 'shop.test', timeout => 10);
        # The test's TERM interrupts the connect or the read (EINTR): not the edge's doing.
        last if $stop;
        my $took = time - $t0;
        $n++;
        $failed++ if $got ne 'a';
        $max = $took if $took > $max;
        if (open my $f, '>', "$dir/probe.tmp") { printf $f "%d %d %.3f\n", $n, $failed, $max; close $f }
        rename "$dir/probe.tmp", "$dir/probe";
        sleep 0.1;
    }
    POSIX::_exit(0);
}

$t->wait_for_log(qr/edge_routes_url hostile: .*an answer larger than 64 MiB/);
pass('an answer larger than 64 MiB is refused');
wait_for(sub { length $t->read_file('hostile.sent') }, 'the first answer given up');
my ($sent) = split /\n/, $t->read_file('hostile.sent');
diag(sprintf 'the server could send %.1f MiB of the 1 GiB it announced', $sent / 1048576);
cmp_ok($sent, '<', 32 << 20, 'one that announces it is refused before its body is read');
my $first = $peak->();
diag(sprintf 'worker peak RSS after the first endless answer: %d MiB', $first / 1024);
cmp_ok($first / 1024, '<', 64 * 2 + 64, 'it stays within twice the list limit and the worker\'s usual size');
# Smaller pages are asked for, down to one object; then the failure backs off.
wait_for(sub { $t->read_file('hostile.log') =~ /ingresses\?limit=1\b/ }, 'pages of one object asked for', 120);
pass('smaller pages are asked for, down to one object');
wait_for(sub { (Edge::Test::status_json($t->port('status'))->{urls}[0]{last_error} // '') =~ /larger than 64 MiB/ },
    'the failure in edge_status');
pass('edge_status says why');
my $lists = () = $t->read_file('hostile.log') =~ /^GET \S+\/ingresses\?/mg;
cmp_ok($lists, '<=', 12, "a bounded number of Ingress lists before the backoff ($lists)");
my $after_lists = $peak->();
kill 'TERM', $probe;
waitpid($probe, 0);
my ($probes, $failed, $max) = split ' ', $t->read_file('probe');
diag(sprintf "probe: %d connections, slowest %.0f ms; worker peak RSS %d MiB", $probes, $max * 1000, $after_lists / 1024);
is($failed, 0, 'no probe failed');
cmp_ok($max, '<', 5, 'no probe waited for the hostile server (its answers take 30 s)');
cmp_ok($after_lists / 1024, '<', 64 * 2 + 64, 'the worker peak RSS stays bounded through all of them');
unlike($t->read_file('error.log'), qr/\[(alert|crit|emerg)\]/, 'no alert');
done_testing;
