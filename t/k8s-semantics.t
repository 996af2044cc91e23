#!/usr/bin/perl
# Kubernetes objects mean what the APIs say (kubectl reads the same objects from the fake API
# server): an Ingress routes its rules' hosts, not a host only on its certificate; the edge
# serves the cluster's default IngressClass (Ingresses without a class included) unless
# ingress_class= names another; a Gateway API route routes once a Gateway accepted it, and
# only the hostnames its listeners take; a host two objects claim stays with the oldest.

use strict;
use warnings;
use Test::More;
use Edge::Test qw(http_get wait_for);
use Edge::FakeKube;
use IO::Socket::INET;
use POSIX ();

my $t = Edge::Test->new;
my $kube = Edge::FakeKube->new($t, 'a', gateway => 1);
my $ing = \&Edge::FakeKube::ingress;
$kube->apply(Edge::FakeKube::ingressclass('nginx', default => 1));
$kube->apply(Edge::FakeKube::ingressclass('internal'));
$kube->apply($ing->('web', 'pub', hosts => ['pub.test'], class => 'nginx'));
$kube->apply($ing->('web', 'int', hosts => ['int.test'], class => 'internal'));
$kube->apply($ing->('web', 'none', hosts => ['none.test']));
$kube->apply($ing->('web', 'cert', hosts => ['own.test'], tls => ['own.test', 'other-cluster.test'], class => 'nginx'));
$kube->apply(Edge::FakeKube::gateway('web', 'gw', ['apps', '*.apps.test'], ['admin', 'admin.test']));
$kube->apply(Edge::FakeKube::route('HTTPRoute', 'web', 'r1', 'a.apps.test', 'nope.test'));
my $waiting = Edge::FakeKube::route('HTTPRoute', 'web', 'waiting', 'w.apps.test');
$waiting->{status}{parents} = [];
$kube->apply($waiting);
# A route without hostnames, attached to the listener "admin" only.
my $r2 = Edge::FakeKube::route('TLSRoute', 'web', 'r2');
$_->{sectionName} = 'admin' for $r2->{spec}{parentRefs}[0], $r2->{status}{parents}[0]{parentRef};
$kube->apply($r2);
$kube->start;

# A second cluster, read without upstream=: each Ingress routes to its load balancer, so the
# answer tells which object kept a host.
my $lb = Edge::FakeKube->new($t, 'b');
$lb->apply($ing->('zz', 'old', hosts => ['shop.test'], ip => '127.0.0.2', created => '2025-01-01T00:00:00Z'));
$lb->apply($ing->('aa', 'new', hosts => ['shop.test'], ip => '127.0.0.3', created => '2026-11-29T10:00:00Z'));
$lb->start;
# 127.0.0.2 (old's) answers "edge", 127.0.0.3 (new's) "new", on the edge's port.
$t->backend('edge', addr => '127.0.0.2');
my $edge = $t->port('edge');
my $listen = IO::Socket::INET->new(Listen => 16, LocalAddr => '127.0.0.3', LocalPort => $edge, ReuseAddr => 1)
    or die "127.0.0.3: $!\n";
my $new_pid = fork() // die;
if ($new_pid == 0) {
    while (my $c = $listen->accept) { syswrite($c, 'new'); shutdown($c, 1); sysread($c, my $x, 1); close $c }
    POSIX::_exit(0);
}
close $listen;
END { local $?; if ($new_pid) { kill 'KILL', $new_pid; waitpid($new_pid, 0) } }

$t->write_routes('routes.json', <<'EOF');
{"upstreams": {"a": {"servers": ["127.0.0.1:%%PORT_a%%"]}}}
EOF
my ($ua, $ub) = ($kube->url, $lb->url);
$t->config(<<"EOF");
    edge_routes %%TESTDIR%%/routes.json;
    edge_routes_url $ua name=a format=k8s upstream=a;
    edge_routes_url $ub name=b format=k8s;
    edge_state %%TESTDIR%%/state;
    server { listen 127.0.0.1:%%PORT_edge%%; edge_route http; proxy_pass \$edge_upstream; }
    server { listen 127.0.0.1:%%PORT_status%%; edge_status; }
    server { listen 127.0.0.1:%%PORT_a%%; return "a"; }
EOF
$t->run;
my $routes = sub { http_get($edge, $_[0]) };
# The Gateways too: admin.test routes only by its listener's hostname.
wait_for(sub { $routes->('pub.test') eq 'a' && $routes->('a.apps.test') eq 'a' && $routes->('admin.test') eq 'a' },
    'both kinds route');

subtest 'Ingress hosts and classes' => sub {
    is($routes->('own.test'), 'a', "a rule's host routes");
    is($routes->('other-cluster.test'), '', 'a host only on the certificate does not');
    is($routes->('pub.test'), 'a', 'an Ingress of the default class routes');
    is($routes->('none.test'), 'a', 'so does one without a class (the default class serves it)');
    is($routes->('int.test'), '', 'one of another class does not');
};
subtest 'Gateway API routes' => sub {
    is($routes->('nope.test'), '', "a route's hostname no listener takes does not route");
    is($routes->('w.apps.test'), '', 'a route no Gateway accepted does not route');
    is($routes->('admin.test'), 'a', "a route without hostnames takes its listener's (sectionName admin)");
    is($routes->('x.apps.test'), '', 'not the other listeners\'');
    # The fetching worker writes the source's state after the table: polled.
    my $st = {};
    wait_for(sub {
        $st = (grep { $_->{name} eq 'a' } @{Edge::Test::status_json($t->port('status'))->{urls}})[0] // {};
        ($st->{unaccepted_routes} // -1) == 1 }, 'the source\'s state');
    is($st->{unaccepted_routes}, 1, 'the route waiting for a Gateway is counted');
    is($st->{default_ingress_class}, 'nginx', 'the default class shows');
};

# The Gateway accepts the route; the cluster's default class changes.
my $accepted = Edge::FakeKube::route('HTTPRoute', 'web', 'waiting', 'w.apps.test');
$kube->apply($accepted);
wait_for(sub { $routes->('w.apps.test') eq 'a' }, 'the route accepted');
pass('a route routes once a Gateway accepted it');
$kube->apply(Edge::FakeKube::ingressclass('nginx'));
$kube->apply(Edge::FakeKube::ingressclass('internal', default => 1));
# Two events: between them no class is the default, and every Ingress routes (int.test
# too): the new default class is in force once pub.test no longer routes.
wait_for(sub { $routes->('int.test') eq 'a' && $routes->('pub.test') eq '' }, 'the new default class');
pass('the old default class no longer routes');
is($routes->('none.test'), 'a', 'Ingresses without a class follow the default class');

is($routes->('shop.test'), 'edge', 'the oldest Ingress keeps shop.test (in zz, although aa sorts first)');

SKIP: {
    skip 'kubectl is not installed', 2 unless system('kubectl version --client >/dev/null 2>&1') == 0;
    my $json = `kubectl --server $ua --insecure-skip-tls-verify get ingressclasses,gateways -A -o json 2>&1`;
    like($json, qr/is-default-class/, 'kubectl reads the IngressClasses');
    like($json, qr/"\*\.apps\.test"/, 'and the Gateways');
}
done_testing;
