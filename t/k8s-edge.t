#!/usr/bin/perl
# URL sources on a whole edge: two clusters with disjoint hosts and one conflict (the source
# declared first wins, and the conflict is logged); 4 workers and one watch connection at the
# API server; a reload under traffic without a failed connection; an exporter that cannot
# watch is polled with its ETag; a native route document by URL; and, without upstream=,
# hosts routed to the Ingress's load-balancer address on the listener's port.

use strict;
use warnings;
use Test::More;
use POSIX ();
use IO::Socket::INET;
use Time::HiRes qw(time sleep);
use Edge::Test qw(http_get wait_for);
use Edge::FakeKube;

my $t = Edge::Test->new;
my $dir = $t->dir;
my $a = Edge::FakeKube->new($t, 'a');
$a->apply(Edge::FakeKube::ingress('web', 'shop', hosts => ['shop.test']));
$a->apply(Edge::FakeKube::ingress('web', 'both', hosts => ['both.test']));
$a->start;
my $b = Edge::FakeKube->new($t, 'b', exporter => 1);
$b->apply(Edge::FakeKube::ingress('ops', 'grafana', hosts => ['grafana.test'], class => 'nginx'));
$b->apply(Edge::FakeKube::ingress('ops', 'both', hosts => ['both.test'], class => 'nginx'));
# The LB address of an Ingress of cluster B: the edge connects to it on its own port.
$b->apply(Edge::FakeKube::ingress('ops', 'direct', hosts => ['direct.test'], ip => '127.0.0.2', class => 'public'));
$b->start;
my $c = Edge::FakeKube->new($t, 'c');
$c->set_document(qq({"upstreams": {"c": {"servers": ["127.0.0.1:@{[$t->port('c')]}"]}}, "routes": {"doc.test": "c"}}));
$c->start;
$t->backend('edge', addr => '127.0.0.2');    # the LB address, on the edge's port

$t->write_routes('routes.json', <<'EOF2');
{"upstreams": {"cluster-a": {"servers": ["127.0.0.1:%%PORT_a%%"]}, "cluster-b": {"servers": ["127.0.0.1:%%PORT_b%%"]}}}
EOF2
my ($ua, $ub, $uc) = ($a->url, $b->url('/apis/networking.k8s.io/v1/ingresses'), $c->url('/edge.json'));
my $conf = <<"EOF2";
    edge_routes %%TESTDIR%%/routes.json;
    edge_routes_url $ua name=cluster-a format=k8s upstream=cluster-a;
    edge_routes_url $ub name=cluster-b format=k8s upstream=cluster-b ingress_class=nginx interval=1s;
    edge_routes_url $ub name=cluster-b-direct format=k8s ingress_class=public interval=1s;
    edge_routes_url $uc name=doc interval=1s;
    edge_state %%TESTDIR%%/state;
    server { listen 127.0.0.1:%%PORT_edge%% reuseport; edge_route http; proxy_pass \$edge_upstream; }
    server { listen 127.0.0.1:%%PORT_status%%; edge_status; }
    server { listen 127.0.0.1:%%PORT_a%%; return "a"; }
    server { listen 127.0.0.1:%%PORT_b%%; return "b"; }
    server { listen 127.0.0.1:%%PORT_c%%; return "c"; }
EOF2
$t->config($conf, workers => 4);
$t->run;
my $edge = $t->port('edge');
my $everywhere = sub {
    my ($name, $want, $what) = @_;
    my $streak = 0;
    wait_for(sub { $streak = http_get($edge, $name) eq $want ? $streak + 1 : 0; $streak >= 20 }, $what, 60);
    pass($what);
};

$everywhere->('shop.test', 'a', 'cluster A routes in every worker');
$everywhere->('grafana.test', 'b', 'cluster B (an exporter, polled) routes in every worker');
$everywhere->('both.test', 'a', 'a host both clusters define goes to the source declared first');
$t->wait_for_log(qr/edge_routes_url cluster-b: routes\["both\.test"\]: already routed by an earlier file, ignored/);
pass('and the conflict is logged');
$everywhere->('doc.test', 'c', 'a native route document by URL routes');
$everywhere->('direct.test', 'edge', "without upstream=, the Ingress's LB address on the listener's port");
is(http_get($edge, 'grafana.test'), 'b', 'ingress_class= keeps each class to its source');

# One fetch per source for the edge: one watch connection per kind at cluster A (Ingresses,
# IngressClasses; it serves no Gateway API) for 4 workers.
wait_for(sub { $a->watching == 2 }, 'the watches at cluster A');
sleep 1;
is($a->watching, 2, 'one watch connection per kind at the API server for 4 workers');
my @fetchers = $t->read_file('error.log') =~ /(\d+)#\d+: edge_routes_url cluster-a: this worker fetches it/g;
is(scalar @fetchers, 1, 'one worker fetches cluster A');

# The exporter cannot watch: it is polled, with If-None-Match once it sent an ETag.
wait_for(sub { grep { $_->[4] ne '-' } @{$b->requests} }, 'a conditional request');
pass('the exporter is polled with If-None-Match');
$b->apply(Edge::FakeKube::ingress('ops', 'loki', hosts => ['loki.test'], class => 'nginx'));
$everywhere->('loki.test', 'b', 'a change at the exporter routes within an interval');

# The worker that fetches killed: another takes the sources over.
my $fetcher = $fetchers[0];
my $mark = length $t->read_file('error.log');
kill 'KILL', $fetcher;
wait_for(sub { substr($t->read_file('error.log'), $mark) =~ /(\d+)#\d+: edge_routes_url cluster-a: this worker fetches it/
    && $1 != $fetcher }, 'another worker fetches cluster A', 60);
pass('a worker killed with SIGKILL: another fetches its sources');
$a->apply(Edge::FakeKube::ingress('web', 'taken-over', hosts => ['taken.test']));
$everywhere->('taken.test', 'a', 'and changes flow through it');
wait_for(sub { $a->watching == 2 }, 'one watch per kind after the takeover', 60);
pass('one watch connection per kind after the takeover');

# A reload under traffic: not one connection fails; the new workers take the sources over.
my $probe = fork() // die;
if ($probe == 0) {
    my ($n, $failed) = (0, 0);
    my $stop = 0;
    $SIG{TERM} = sub { $stop = 1 };
    while (!$stop) {
        my $t0 = time;
        my $s = IO::Socket::INET->new(PeerAddr => "127.0.0.1:$edge", Timeout => 10);
        my $got = '';
        if ($s) { print $s "GET / HTTP/1.0\r\nHost: shop.test\r\n\r\n"; sysread($s, $got, 1); close $s }
        # The test's TERM interrupts the connect or the read (EINTR): not the edge's doing.
        last if $stop;
        $n++;
        if ($got ne 'a') {
            $failed++;
            if (open my $f, '>>', "$dir/probe.failures") {
                printf $f "%.3f %s '%s'\n", $t0, $s ? 'connected' : "no connection: $!", $got;
                close $f;
            }
        }
        if (open my $f, '>', "$dir/probe.tmp") { print $f "$n $failed\n"; close $f }
        rename "$dir/probe.tmp", "$dir/probe";
        sleep 0.02;
    }
    POSIX::_exit(0);
}
my $probed = sub { (($t->read_file('probe') =~ /^(\d+)/)[0] // 0) };
wait_for(sub { $probed->() > 20 }, 'the probe under way');
$t->reload;
$a->apply(Edge::FakeKube::ingress('web', 'after-reload', hosts => ['after.test']));
$everywhere->('after.test', 'a', 'after the reload, changes flow');
wait_for(sub { $t->read_file('error.log') =~ /gracefully shutting down/ }, 'old workers leave');
# Through the reload and some way past it.
my $at_reload = $probed->();
wait_for(sub { $probed->() > $at_reload + 30 }, 'the probe past the reload');
kill 'TERM', $probe;
waitpid($probe, 0);
my ($probes, $failed) = split ' ', $t->read_file('probe');
ok($probes > 50, "the probe ran through the reload ($probes connections)");
is($failed, 0, 'no connection failed during the reload') or diag $t->read_file('probe.failures');
wait_for(sub { $a->watching == 2 }, 'one watch per kind again', 60);
pass('the old workers closed their watches; the new leader holds one per kind');

# The one alert: the master saying that the killed worker exited on signal 9.
my @alerts = grep { /\[(alert|crit|emerg)\]/ && !/worker process $fetcher exited on signal 9/ }
    split /\n/, $t->read_file('error.log');
is_deeply(\@alerts, [], 'no other alert in error.log');
done_testing;
