#!/usr/bin/perl
# Servers from the cluster: an upstream whose servers are the nodes of a Kubernetes source
# (`discover=nodes`, `"discover"` in the route file), driven by the real kubectl against the
# fake API server. Nodes are backends on 127.0.0.2-6, on the edge's own port (a hostPort
# ingress controller). `kubectl cordon` drains a node: no new connection goes to it, and a
# connection already open to it keeps transferring; `uncordon` brings it back. A node added
# takes connections; a NotReady one, one excluded from external load balancers, one the
# autoscaler is about to delete and one outside the selector take none. When no node is
# eligible, the upstream keeps its previous servers (fail open). nginx -t refuses an upstream
# whose source does not discover nodes.

use strict;
use warnings;
use Test::More;
use JSON::PP;
use IO::Socket::INET;
use Time::HiRes qw(time);
use Edge::Test qw(wait_for echo_name echo_serves);
use Edge::FakeKube;

plan skip_all => 'kubectl is not installed' unless system('kubectl version --client >/dev/null 2>&1') == 0;

my $t = Edge::Test->new;
my $dir = $t->dir;
my $edge = $t->port('edge');
my %ip = (a1 => '127.0.0.2', a2 => '127.0.0.3', a3 => '127.0.0.4', a4 => '127.0.0.5', w1 => '127.0.0.6');
my $ingress = { 'node-role.kubernetes.io/ingress' => 'true' };
my $kube = Edge::FakeKube->new($t, 'a');
$kube->apply(Edge::FakeKube::node($_, $ip{$_}, labels => $ingress)) for qw(a1 a2 a3);
$kube->apply(Edge::FakeKube::node('w1', $ip{w1}));
$kube->start;
$t->backend($_, addr => $ip{$_}, port => $edge, mode => 'echo') for sort keys %ip;

$kube->kubeconfig;
sub kubectl {
    my $out = `kubectl @_ 2>&1`;
    is($?, 0, "kubectl @_") or diag $out;
    return $out;
}

$t->write_routes('routes.json', <<'EOF');
{"upstreams": {"ingress": {"discover": {"source": "cluster-a", "nodes": {"selector": "node-role.kubernetes.io/ingress=true"}},
                           "balance": "round_robin"}},
 "routes": {"app.test": "ingress"}}
EOF
my $url = $kube->url;
# Two workers: the one that reads the cluster, and one that builds its tables from the image.
$t->config(<<"EOF", workers => 2);
    edge_routes %%TESTDIR%%/routes.json;
    edge_routes_url $url name=cluster-a format=k8s discover=nodes;
    edge_state %%TESTDIR%%/state;
    server { listen 127.0.0.1:%%PORT_edge%%; edge_route http; proxy_pass \$edge_upstream; }
    server { listen 127.0.0.1:%%PORT_status%%; edge_status; }
EOF
$t->run;
my $status = $t->port('status');

# Which node a new connection reaches, and the set of nodes over runs of them.
my $who = sub { echo_name($edge, 'app.test') };
my $serves = sub { echo_serves($edge, 'app.test', @_) };

$serves->('a1,a2,a3', 'the selected nodes take connections, the worker outside the selector none');
my $nodes = decode_json(kubectl('get nodes -o json'))->{items};
is_deeply([sort map { $_->{metadata}{name} } @$nodes], [qw(a1 a2 a3 w1)], 'kubectl lists the nodes');
is(kubectl(q{get node a2 -o 'jsonpath={.status.conditions[?(@.type=="Ready")].status}'}), 'True',
    'and reads one of them Ready');

# A connection open to a2 before its cordon.
my $held;
for (1 .. 20) {
    my ($got, $s) = $who->();
    if ($got eq 'a2') { $held = $s; last }
}
ok($held, 'a connection to a2 is open');

kubectl('cordon a2');
is($kube->get('Node', undef, 'a2')->{spec}{unschedulable}, JSON::PP::true(), 'the API server holds the cordon');
is(kubectl(q{get node a2 -o 'jsonpath={.spec.unschedulable}'}), 'true', 'and kubectl reads it back');
my $took = $serves->('a1,a3', 'kubectl cordon a2: no new connection goes to a2');
diag sprintf 'cordon to a2 out: within %.2f s', $took;
# (Whichever worker answers the status: each one switches tables on its own.)
my $a2 = wait_for(sub { my $s = Edge::Test::server_state($status, 'ingress', $ip{a2}) // {};
    ($s->{state} // '') eq 'draining' && $s }, 'status to show a2 draining');
is($a2->{state}, 'draining', 'status shows a2 draining');
is($a2->{active}, 1, 'with its one open connection');
my (undef, $metrics) = Edge::Test::status_get($status, '/metrics');
like($metrics, qr/^nginx_edge_server_draining\{upstream="ingress",server="\Q$ip{a2}\E"\} 1$/m, 'and in /metrics');
$t->wait_for_log(qr/\[notice\] .*upstreams\.ingress: server \Q$ip{a2}\E is draining \(cordoned\): no new connection goes to it, the open ones continue/);
pass('and the error log says so');
my $echo = '';
if ($held) {
    print $held "still there\n";
    $held->autoflush(1);
    my $deadline = time + 10;
    while ($echo !~ /still there\n$/ && time < $deadline) {
        my $n = sysread($held, my $buf, 4096);
        last unless $n;
        $echo .= $buf;
    }
}
like($echo, qr/still there\n$/, 'the connection open to a2 keeps transferring');
close $held if $held;

wait_for(sub { (Edge::Test::server_state($status, 'ingress', $ip{a2}) // {})->{active} == 0 }, 'a2 drained');
pass('once that connection is closed, a2 has none');

kubectl('uncordon a2');
$serves->('a1,a2,a3', 'kubectl uncordon a2: a2 takes connections again');
wait_for(sub { ((Edge::Test::server_state($status, 'ingress', $ip{a2}) // {})->{state} // '') eq 'up' }, 'status to show a2 up');
pass('and status shows it up');
$t->wait_for_log(qr/\[notice\] .*upstreams\.ingress: server \Q$ip{a2}\E takes new connections again/);
my @drained = grep { /server \Q$ip{a2}\E is draining/ } split /\n/, $t->read_file('error.log');
is(scalar @drained, 1, 'the drain was said once, by the worker that reads the cluster') or diag explain \@drained;

$kube->apply(Edge::FakeKube::node('a4', $ip{a4}, labels => $ingress));
$serves->('a1,a2,a3,a4', 'a node added takes connections');
$t->wait_for_log(qr/\[notice\] .*upstreams\.ingress: server \Q$ip{a4}\E is added: it takes new connections/);

$kube->apply(Edge::FakeKube::node('a3', $ip{a3}, labels => $ingress, ready => 'False'));
$serves->('a1,a2,a4', 'a NotReady node takes none');
$t->wait_for_log(qr/\[notice\] .*upstreams\.ingress: server \Q$ip{a3}\E is out \(NotReady\)/);

kubectl('label node a1 node.kubernetes.io/exclude-from-external-load-balancers=true');
$serves->('a2,a4', 'a node excluded from external load balancers takes none');
$t->wait_for_log(qr/\[notice\] .*upstreams\.ingress: server \Q$ip{a1}\E is out \(excluded from external load balancers\)/);

$kube->apply(Edge::FakeKube::node('a4', $ip{a4}, labels => $ingress, taints => ['ToBeDeletedByClusterAutoscaler']));
$serves->('a2', 'a node the autoscaler is about to delete takes none');

# Fail open: a2 goes Unknown (a partition), and no node is eligible.
$kube->apply(Edge::FakeKube::node('a2', $ip{a2}, labels => $ingress, ready => 'Unknown'));
$t->wait_for_log(qr/upstreams\.ingress: no node is eligible \(4 node\(s\) of cluster-a selected: 1 draining, 3 out\); its 1 previous server\(s\), unready, are kept \(fail open\)/);
pass('no node eligible: said');
$serves->('a2', 'and the upstream keeps its previous server');
# A reload (or a restart) has no previous table: every unready node is taken.
$t->reload;
$serves->('a2,a3', 'after a reload, fail open takes every unready node');
$kube->apply(Edge::FakeKube::node('a3', $ip{a3}, labels => $ingress));
$serves->('a3', 'a node Ready again takes over');
# The last eligible node deleted: it is not taken back; the unready one is.
$kube->delete(Edge::FakeKube::node('a3', $ip{a3}));
$serves->('a2', 'a node deleted is gone, fail open takes the unready one');

my @alerts = grep { /\[(alert|crit|emerg)\]/ } split /\n/, $t->read_file('error.log');
is_deeply(\@alerts, [], 'no alert in error.log');
$t->stop;

# nginx -t: an upstream whose source does not discover nodes, and one naming no source.
for my $case (['cluster-a', '', 'no edge_routes_url name=cluster-a with discover=nodes among the sources of this table'],
    ['elsewhere', 'discover=nodes', 'no edge_routes_url name=elsewhere with discover=nodes']) {
    my ($source, $args, $message) = @$case;
    my $u = Edge::Test->new;
    $u->write_routes('routes.json', qq({"upstreams": {"i": {"discover": {"source": "$source", "nodes": {}}}}, "routes": {"x.test": "i"}}));
    $u->config(<<"EOF");
    edge_routes %%TESTDIR%%/routes.json;
    edge_routes_url $url name=cluster-a format=k8s $args;
    edge_state %%TESTDIR%%/state;
    server { listen 127.0.0.1:%%PORT_edge%%; edge_route http; proxy_pass \$edge_upstream; }
EOF
    my ($ok, $out) = $u->test_config;
    ok(!$ok, "nginx -t refuses an upstream discovering from $source" . ($args ? " ($args)" : ''));
    like($out, qr/\Q$message\E/, 'and says why') or diag $out;
}
done_testing;
