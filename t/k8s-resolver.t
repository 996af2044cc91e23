#!/usr/bin/perl
# A URL with a host name: resolved by nginx's resolver (here pebble-challtestsrv's DNS, which
# answers 127.0.0.1 for every name), sent as SNI, and verified against the certificate's DNS
# name. Without `resolver`, nginx -t says that the name needs one.

use strict;
use warnings;
use Test::More;
use IO::Socket::INET;
use HTTP::Tiny;
use POSIX ();
use Edge::Test qw(http_get wait_for);
use Edge::FakeKube;

plan skip_all => 'pebble-challtestsrv is not installed (nginx-test/prereqs installs it)'
    unless grep { -x "$_/pebble-challtestsrv" } split /:/, $ENV{PATH};

my $t = Edge::Test->new;
my $dir = $t->dir;
my ($dns, $mgmt) = ($t->port('dns'), $t->port('dns_mgmt'));
my $dns_pid = fork() // die;
if ($dns_pid == 0) {
    open STDOUT, '>', "$dir/dns.log";
    open STDERR, '>&', \*STDOUT;
    exec 'pebble-challtestsrv', '-management', "127.0.0.1:$mgmt", '-dns01', "127.0.0.1:$dns",
        '-http01', '', '-https01', '', '-tlsalpn01', '', '-defaultIPv4', '127.0.0.1', '-defaultIPv6', '';
    exit 127;
}
wait_for(sub { IO::Socket::INET->new(PeerAddr => "127.0.0.1:$mgmt", Timeout => 1) }, 'the DNS server');

$t->ca('ca');
my @cert = $t->signed_certificate('ca', 'api', 'DNS:api.cluster.test');
my $kube = Edge::FakeKube->new($t, 'a', tls => \@cert, token => 'tok');
$kube->apply(Edge::FakeKube::ingress('web', 'shop', hosts => ['shop.test']));
$kube->start;
$t->write_file('token', "tok\n");
$t->write_routes('routes.json', <<'EOF2');
{"upstreams": {"a": {"servers": ["127.0.0.1:%%PORT_a%%"]}}}
EOF2
my $port = $kube->port;
my $stream = <<"EOF2";
    edge_routes %%TESTDIR%%/routes.json;
    edge_routes_url https://api.cluster.test:$port name=a format=k8s upstream=a
                    token_file=%%TESTDIR%%/token ca=%%TESTDIR%%/ca.crt;
    edge_state %%TESTDIR%%/state;
    server { listen 127.0.0.1:%%PORT_edge%%; edge_route http; proxy_pass \$edge_upstream; }
    server { listen 127.0.0.1:%%PORT_a%%; return "a"; }
EOF2
$t->config($stream);
my ($ok, $out) = $t->test_config;
ok(!$ok && $out =~ /"api\.cluster\.test" is a host name: it needs "resolver"/, 'nginx -t: a host name needs resolver')
    or diag $out;

# The name has an address per control-plane node, two of them down (nothing listens there):
# each is tried in turn, at once, and none of them makes the source fail.
my $added = HTTP::Tiny->new(timeout => 5)->post("http://127.0.0.1:$mgmt/add-a", { content =>
    '{"host": "api.cluster.test.", "addresses": ["127.0.0.2", "127.0.0.3", "127.0.0.1"]}' });
$added->{success} or die "add-a: $added->{status} $added->{content}\n";
my $mark = length $t->read_file('error.log');
$t->config("    resolver 127.0.0.1:$dns valid=10s;\n" . $stream);
$t->run;
my $edge = $t->port('edge');
wait_for(sub { http_get($edge, 'shop.test') eq 'a' }, 'a route read from api.cluster.test');
pass('the host name is resolved, sent as SNI and verified by name');
$kube->apply(Edge::FakeKube::ingress('web', 'blog', hosts => ['blog.test']));
wait_for(sub { http_get($edge, 'blog.test') eq 'a' }, 'the watch');
pass('and watched');
my $log = substr($t->read_file('error.log'), $mark);
unlike($log, qr/\[(alert|crit|emerg)\]/, 'no alerts in error.log');
unlike($log, qr/\[error\].*edge_routes_url/, 'no address that refused made the source fail: the next was tried at once');
like($log, qr/cannot connect to 127\.0\.0\.[23]:\d+ .*: trying 127\.0\.0\.\d/, 'a refused address is said at info, with the next one tried')
    or diag(join "\n", grep { /edge_routes_url/ } split /\n/, $log);

$t->stop;
kill 'TERM', $dns_pid;
waitpid($dns_pid, 0);
done_testing;
