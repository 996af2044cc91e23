# The measurement behind nginx-test/bench/switch.
use strict;
use warnings;
use Edge::Test qw(wait_for);

my $swaps = shift // 3;

# Each version changes one server of every upstream (a new health record each) or one route.
my %shapes = (
    '10,000 upstreams x 3 servers' => sub {
        my ($v) = @_;
        my $u = join ",\n", map {
            my ($a, $b) = (int($_ / 250), $_ % 250);
            qq{"u$_": {"servers": ["10.1.$a.$b:443", "10.2.$a.$b:443", "10.3.$a.$b:$v"]}}
        } 0 .. 9999;
        my $r = join ",\n", map { qq{"r$_.test": "u$_"} } 0 .. 9999;
        return qq({"upstreams": {$u}, "routes": {$r}});
    },
    '100,000 routes' => sub { routes(100_000, @_) },
    '1,000,000 routes' => sub { routes(1_000_000, @_) },
);

sub routes {
    my ($n, $v) = @_;
    my $r = join ",\n", map { qq{"n$_.test": "u"} } 0 .. $n - 2;
    return qq({"upstreams": {"u": {"servers": ["10.0.0.1:443"]}}, "routes": {$r, "v$v.test": "u"}});
}

printf "| %-30s | %5s | %14s | %18s | %12s |\n", 'table', 'swap', 'built in (ms)', 'event loop (ms)', 'image (MB)';
printf "|%s|\n", join '|', map { '-' x ($_ + 2) } 30, 5, 14, 18, 12;
for my $shape ('10,000 upstreams x 3 servers', '100,000 routes', '1,000,000 routes') {
    my $t = Edge::Test->new;
    $t->write_routes('routes.json', $shapes{$shape}->(1000));
    $t->config(<<'CONF');
    edge_routes %%TESTDIR%%/routes.json interval=100ms;
    edge_zone z 16m;
    server { listen 127.0.0.1:%%PORT_edge%%; edge_route http; proxy_pass $edge_upstream; }
    server { listen 127.0.0.1:%%PORT_status%%; edge_status; }
CONF
    $t->run;
    for my $swap (1 .. $swaps) {
        $t->write_routes('routes.json', $shapes{$shape}->(1000 + $swap));
        my $g = $swap + 1;
        $t->wait_for_log(qr/table $g in service/);
        my $log = $t->read_file('error.log');
        my ($built) = $log =~ /table $g loaded, .* in ([\d.]+) ms/;
        my ($loop) = $log =~ /table $g in service; this worker's event loop spent ([\d.]+) ms/;
        my $image = Edge::Test::status_json($t->port('status'))->{sources}[0]{image_bytes};
        printf "| %-30s | %5d | %14.1f | %18.2f | %12.1f |\n", $shape, $swap, $built, $loop, $image / 1048576;
    }
    $t->stop;
}
